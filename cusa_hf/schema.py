"""The data schema every cusa-hf dataset follows, defined once.

A retrieval dataset has one row per caption and three columns:

* ``image`` (:data:`IMAGE_COLUMN`): an absolute file path (JSON and path-based datasets) or a ``datasets.Image``;
* ``caption`` (:data:`CAPTION_COLUMN`): a non-empty string of valid Unicode (:func:`is_caption`);
* ``image_id`` (:data:`IMAGE_ID_COLUMN`): the same value on every caption row of one image. Ids are kept as integers
  when every id is an integer and turned into strings otherwise (:func:`normalize_image_ids`; Arrow columns hold one
  type), and become tensor entries through :func:`stable_image_id`, which gives the same integer in every process.

Captions of one image are found by :func:`first_row_per_image`. Loaders (``cusa_hf.data``), the collator, the
evaluation view and the feature caches all use these helpers, so what counts as a caption or an image is decided here.

Feature columns added to a split (``cusa_hf.teachers``, ``cusa_hf.frozen_towers``) are named here too: the teachers'
image and text features, the cached output of frozen towers, and the provenance column recording what made each.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
IMAGE_ID_COLUMN = "image_id"

#: The frozen teachers' features (``cusa_hf.teachers.features.add_teacher_features``).
TEACHER_IMAGE_COLUMN = "teacher_image_embeds"
TEACHER_TEXT_COLUMN = "teacher_text_embeds"
#: The cached pooled output of a frozen vision / text tower (``cusa_hf.frozen_towers``).
IMAGE_TOWER_COLUMN = "image_tower_features"
TEXT_TOWER_COLUMN = "text_tower_features"
#: The two modalities, which name feature sources and towers.
MODALITIES = ("image", "text")
#: What made each feature column above, teachers and frozen towers alike (``cusa_hf.teachers.provenance``). Its name
#: predates the frozen towers; it is kept because saved datasets and the feature caches carry it.
PROVENANCE_COLUMN = "teacher_provenance"

# Column names tried, in order, when a Hub dataset's columns are not given explicitly.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "image_path", "filepath", "file_name", "filename")
CAPTION_COLUMN_CANDIDATES = ("caption", "captions", "sentences", "text", "raw")
IMAGE_ID_COLUMN_CANDIDATES = ("image_id", "img_id", "imgid", "cocoid")


class InvalidRecordError(ValueError):
    """A record with an empty caption or a missing image; the message names the record and the field."""


def is_caption(value: Any) -> bool:
    """A usable caption: valid Unicode text with at least one non-blank character (:func:`caption_problem`)."""
    return caption_problem(value) is None


def caption_problem(value: Any) -> str | None:
    """What makes ``value`` no caption (``"is empty: ''"``, ...), or ``None`` for a caption. A string holding a lone
    surrogate (``"\\udcff"``, which JSON escapes can produce) is no Unicode text: Arrow, tokenizers and files refuse
    it."""
    if not isinstance(value, str):
        return f"is not text: {value!r}"
    if not value.strip():
        return f"is empty: {value!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"is not valid Unicode text (a lone surrogate {value[error.start]!r} at character {error.start}): {value!r}"
    return None


def normalize_image_ids(values: Iterable[Any]) -> list[Any]:
    """Image ids as one Arrow-storable type: all integers stay integers, anything else becomes its string form.

    ``numpy`` integers count as integers; booleans are rejected (``True == 1`` would merge two images), and so is a
    mix of integers and strings (``1`` and ``"1"`` would merge).
    """
    values = list(values)
    for value in values:
        if isinstance(value, bool):
            raise ValueError(f"image ids must be integers or strings, got the boolean {value!r}")
    as_ints = [value.item() if hasattr(value, "item") and not isinstance(value, str) else value for value in values]
    if all(isinstance(value, int) for value in as_ints):
        return as_ints
    first_int = next((row for row, value in enumerate(as_ints) if isinstance(value, int)), None)
    first_str = next((row for row, value in enumerate(as_ints) if isinstance(value, str)), None)
    if first_int is not None and first_str is not None:
        raise ValueError(
            f"image ids mix integers and strings (row {first_int}: {as_ints[first_int]!r}, row {first_str}: "
            f"{as_ints[first_str]!r}); stored as one column they would merge ids such as 1 and '1' into one image. "
            "Give every image id the same type"
        )
    return [str(value) for value in as_ints]


def stable_image_id(value: Any) -> int:
    """A 63-bit integer id for an image id value, identical in every process (so multi-positive targets stay
    correct when features are gathered): integers pass through, anything else is hashed from its string form."""
    if isinstance(value, bool):
        raise ValueError(f"image id must be an int or a string, got the bool {value!r}")
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and not isinstance(value, str):
        return stable_image_id(value.item())
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def first_row_per_image(
    image_ids: Sequence[Any], images: Sequence[Any] | None = None, id_column: str = IMAGE_ID_COLUMN
) -> dict[Any, int]:
    """``{image id: first row holding it}``, in order of first appearance.

    Args:
        image_ids: the image id of every row.
        images: the image value of every row (paths); when given, an id whose rows name two different images is
            refused (two pictures would otherwise share one id and one feature vector).
        id_column: the id column's name, for the error message.
    """
    first_row: dict[Any, int] = {}
    for row, image_id in enumerate(image_ids):
        if image_id not in first_row:
            first_row[image_id] = row
        elif images is not None and images[row] != images[first_row[image_id]]:
            raise ValueError(
                f"{id_column} {image_id!r} names two different images: {images[first_row[image_id]]!r} "
                f"(row {first_row[image_id]}) and {images[row]!r} (row {row})"
            )
    return first_row
