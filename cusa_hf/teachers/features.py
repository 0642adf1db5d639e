"""Teacher features as dataset columns: :func:`add_teacher_features` loads the teachers and runs them through the
feature cache; :func:`reuse_or_add_teacher_features` keeps columns already made by the teachers asked for."""

from __future__ import annotations

import logging
import os
from typing import Any

import datasets
import torch

from .feature_cache import FeatureCacheOptions, FeatureColumns, add_feature_columns
from .image_tables import has_feature_column
from ..schema import PROVENANCE_COLUMN, TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .provenance import read_feature_provenance
from .registry import load_image_teacher, load_text_teacher

logger = logging.getLogger(__name__)


def add_teacher_features(
    dataset: datasets.Dataset,
    image_teacher: Any = None,
    text_teacher: Any = None,
    batch_size: int = 64,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    image_id_column: str = "image_id",
    image_root: str | os.PathLike | None = None,
    image_feature_column: str = TEACHER_IMAGE_COLUMN,
    text_feature_column: str = TEACHER_TEXT_COLUMN,
    provenance_column: str = PROVENANCE_COLUMN,
    image_pooling: str = "auto",
    image_teacher_name: str | None = None,
    image_teacher_revision: str | None = None,
    text_teacher_name: str | None = None,
    text_teacher_revision: str | None = None,
    normalize: bool = True,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
    show_progress: bool = True,
) -> datasets.Dataset:
    """Add frozen-teacher features to a one-row-per-caption dataset.

    Each unique image (grouped by ``image_id_column``, else by image path) and each unique caption is encoded once.
    Image features are stored once per image, in a per-image table that every row points into through
    ``<image_feature_column>_index`` (the training split joins them as batches are drawn, ``training_split``); every
    row gets its caption's feature. Features are L2-normalised by default (CUSA only uses their cosine similarities)
    and stored as fixed-length float32 (or float16) lists.

    Args:
        dataset: rows with an image (``datasets.Image`` or a file path, absolute or relative to ``image_root``),
            a caption and, ideally, an image id.
        image_teacher: see :func:`load_image_teacher`; ``None`` adds no image features.
        text_teacher: see :func:`load_text_teacher`; ``None`` adds no text features.
        batch_size: inputs per teacher forward pass.
        image_column, caption_column, image_id_column: input column names.
        image_feature_column, text_feature_column, provenance_column: output column names.
        image_pooling, image_teacher_name, image_teacher_revision: see :func:`load_image_teacher`.
        text_teacher_name, text_teacher_revision: see :func:`load_text_teacher`.
        normalize: L2-normalise features (``False`` stores the teacher's raw output).
        dtype: ``"float32"`` or ``"float16"`` storage (normalisation is done in float32 before the cast).
        device: where the teachers run; defaults to this process's accelerator (``accelerate.PartialState``).
        skip_bad_images: drop rows whose image cannot be read and report them in a warning, instead of raising.
        cache_dir: folder of the cached feature table; defaults to the dataset's cache folder, or
            ``$HF_DATASETS_CACHE/cusa_hf_teachers`` for in-memory datasets. With caching disabled
            (``datasets.disable_caching()``) and no ``cache_dir``, nothing is reused.
        load_from_cache_file: reuse a feature table computed earlier for the same data, teachers and options.
        show_progress: tqdm progress bars (main process only).

    The column names and the options are those of :class:`FeatureColumns` and :class:`FeatureCacheOptions`, which
    :func:`cusa_hf.teachers.feature_cache.add_feature_columns` takes. Under ``accelerate launch`` with N processes,
    each process encodes a contiguous share of whole batches; the shares are gathered so that every process returns
    the same dataset, identical to a one-process run.

    Returns:
        the input dataset plus the text feature column, the image index column and the provenance column, in the
        input's row order (minus dropped rows).

    Raises:
        BadImageError: an image cannot be read (message names the file and the row), unless ``skip_bad_images``.
        ValueError: a column is missing or already present, or an option is invalid.

    Example:
        >>> train = add_teacher_features(train, image_teacher="offline:efficientnet-lite0",
        ...                              text_teacher="offline:all-MiniLM-L6-v2", batch_size=32)
        >>> train.features["teacher_text_embeds"]
        List(Value('float32'), length=384)
        >>> image_feature_tables(train)["teacher_image_embeds"].dim
        1280
    """
    from accelerate import PartialState

    if image_teacher is None and text_teacher is None:
        raise ValueError("pass image_teacher, text_teacher or both")
    options = FeatureCacheOptions(
        batch_size=batch_size,
        normalize=normalize,
        dtype=dtype,
        skip_bad_images=skip_bad_images,
        cache_dir=cache_dir,
        load_from_cache_file=load_from_cache_file,
        show_progress=show_progress,
    )
    columns = FeatureColumns(
        image_column=image_column,
        caption_column=caption_column,
        image_id_column=image_id_column,
        image_root=image_root,
        image_feature_column=image_feature_column,
        text_feature_column=text_feature_column,
        provenance_column=provenance_column,
    )
    # Checked before the teachers load, which can take a while.
    teachers = {"image": image_teacher, "text": text_teacher}
    columns.check(dataset, [modality for modality, teacher in teachers.items() if teacher is not None])
    device = torch.device(device) if device is not None else PartialState().device
    sources = []
    if image_teacher is not None:
        encoder = load_image_teacher(image_teacher, device, image_pooling, image_teacher_name, image_teacher_revision)
        sources.append(encoder.feature_source())
    if text_teacher is not None:
        sources.append(load_text_teacher(text_teacher, device, text_teacher_name, text_teacher_revision).feature_source())
    return add_feature_columns(dataset, sources, columns, options)


def reuse_or_add_teacher_features(
    dataset: datasets.Dataset,
    image_teacher: str,
    text_teacher: str,
    *,
    image_feature_column: str = TEACHER_IMAGE_COLUMN,
    text_feature_column: str = TEACHER_TEXT_COLUMN,
    provenance_column: str = PROVENANCE_COLUMN,
    **options: Any,
) -> datasets.Dataset:
    """The dataset with the named teachers' features: the columns it already has when their recorded teachers are
    the ones named (e.g. a folder written by ``cusa-extract-teachers``), else :func:`add_teacher_features` with
    ``options``.

    Args:
        image_teacher, text_teacher: teacher names or paths as :func:`add_teacher_features` takes them; compared with
            the ``name_or_path`` recorded in the provenance column.

    Raises:
        ValueError: the dataset has feature columns made by other teachers (both names given), or only one of the
            two columns, or columns without provenance.
    """
    present = [column for column in (image_feature_column, text_feature_column) if has_feature_column(dataset, column)]
    if not present:
        return add_teacher_features(
            dataset, image_teacher=image_teacher, text_teacher=text_teacher, image_feature_column=image_feature_column,
            text_feature_column=text_feature_column, provenance_column=provenance_column, **options,
        )  # fmt: skip
    if len(present) == 1:
        raise ValueError(
            f"the dataset has the teacher column {present[0]!r} but not the other one; compute both with "
            "add_teacher_features (or cusa-extract-teachers) or remove it"
        )
    recorded = read_feature_provenance(dataset, provenance_column).get("teachers", {})
    for column, requested in ((image_feature_column, image_teacher), (text_feature_column, text_teacher)):
        made_with = recorded.get(column, {}).get("name_or_path")
        if made_with is None:
            raise ValueError(f"the dataset's column {column!r} records no teacher, so it cannot be checked; recompute it")
        if str(made_with) != str(requested):
            raise ValueError(
                f"the dataset's column {column!r} was computed with the teacher {made_with!r}, but {requested!r} was "
                "asked for; ask for that teacher, or remove the column to compute it with the new one"
            )
    logger.info(
        "using the dataset's teacher features (%s: %s, %s: %s) recorded in its provenance",
        image_feature_column, image_teacher, text_feature_column, text_teacher,
    )  # fmt: skip
    return dataset
