"""Streaming data: writing a one-row-per-caption dataset as WebDataset tar shards, reading them back (map-style or as
a stream), and the training split as an ``IterableDataset`` with its teacher features joined in
(``DataArguments.streaming``)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Sequence

import datasets

from .images import load_image, resolve_image_path
from .schema import IMAGE_COLUMN, IMAGE_ID_COLUMN
from .teachers.image_tables import join_feature_tables
from .teachers.provenance import read_feature_provenance

#: The files of one sample of a shard: ``{key}.jpg`` (image), ``{key}.txt`` (caption), ``{key}.json`` (image id).
SAMPLE_FILES = ("jpg", "txt", "json")

def write_webdataset_shards(
    dataset: datasets.Dataset,
    folder: str | os.PathLike,
    shard_size: int = 1000,
    image_root: str | os.PathLike | None = None,
) -> list[Path]:
    """Write a one-row-per-caption dataset as WebDataset tar shards, ``shard_size`` rows per ``shard-NNNNN.tar``.

    Each row is one sample of three files: ``{key}.jpg`` (the image: JPEG files byte for byte, other images
    re-encoded as JPEG at quality 95), ``{key}.txt`` (the caption) and ``{key}.json`` (``{"image_id": ...}``). An
    image is stored once per caption row, as WebDataset samples do not share files.

    Example:
        >>> write_webdataset_shards(load_json_dataset("coco/train.json"), "coco-shards", shard_size=5000)
        [PosixPath('coco-shards/shard-00000.tar'), ...]
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if isinstance(dataset.features.get(IMAGE_COLUMN), datasets.Image):
        dataset = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(dataset), shard_size):
        shard = folder / f"shard-{start // shard_size:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for row in range(start, min(start + shard_size, len(dataset))):
                record = dataset[row]
                files = {
                    "jpg": _jpeg_bytes(record[IMAGE_COLUMN], image_root, row),
                    "txt": record["caption"].encode("utf-8"),
                    "json": json.dumps({IMAGE_ID_COLUMN: record[IMAGE_ID_COLUMN]}).encode("utf-8"),
                }
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{row:09d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


def _jpeg_bytes(value: Any, image_root: str | os.PathLike | None, row: int) -> bytes:
    """The image as JPEG bytes: a JPEG file or ``datasets.Image`` bytes as they are, anything else re-encoded."""
    data = None
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, (dict, str)):
        path = value["path"] if isinstance(value, dict) else value
        if path and os.path.isfile(resolve_image_path(path, image_root)):
            data = Path(resolve_image_path(path, image_root)).read_bytes()
    if data is not None and data[:3] == b"\xff\xd8\xff":
        return data
    buffer = io.BytesIO()
    load_image(value, image_root, where=f"row {row}").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def is_webdataset_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.tar"))


def load_webdataset_shards(
    folder: str | os.PathLike, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """WebDataset tar shards (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` holding ``image_id``: what
    :func:`write_webdataset_shards` writes) as one row per caption (``image``, ``caption``, ``image_id``), read with
    ``datasets.load_dataset("webdataset", ...)``: map-style (converted once into the ``datasets`` cache, images as
    ``datasets.Image``), or with ``streaming=True`` an ``IterableDataset`` that reads the shards as it goes.

    Every shard is checked first (:func:`check_webdataset_shards`), streamed or not.

    Raises:
        FileNotFoundError: the folder holds no ``.tar`` file.
        ValueError: a shard is cut off or not a tar archive, a sample lacks its ``jpg``, ``txt`` or ``json`` file, a
            ``json`` holds no ``image_id``, or the shards mix integer and string ids (the message names the shard and
            the sample's key).
    """
    shards = sorted(str(path) for path in Path(folder).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no WebDataset .tar shards")
    check_webdataset_shards(shards)
    raw = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=streaming)
    features = None
    if raw.features is not None and IMAGE_ID_COLUMN in raw.features["json"]:
        features = datasets.Features(
            {"image": raw.features["jpg"], "caption": raw.features["txt"], "image_id": raw.features["json"][IMAGE_ID_COLUMN]}
        )
    rows = raw.rename_columns({"jpg": "image", "txt": "caption"})
    other = [column for column in rows.column_names if column not in ("image", "caption")]
    return rows.map(_image_id_of_sample, input_columns=["json"], remove_columns=other, features=features)


def _image_id_of_sample(record: dict[str, Any]) -> dict[str, Any]:
    return {IMAGE_ID_COLUMN: record[IMAGE_ID_COLUMN]}


def check_webdataset_shards(shards: Sequence[str | os.PathLike]) -> None:
    """Check WebDataset shards before they are read, reading only the tar headers and each sample's small ``.json``:
    every shard is a whole tar archive (no member runs past its end), every sample has its ``jpg``, ``txt`` and
    ``json`` files, every ``json`` holds an ``image_id``, and the ids of all shards are of one type (integers or
    strings: read as one column, ``7`` would become ``"7"`` and merge with a string id ``"7"``, or fail to convert).

    Raises:
        ValueError: naming the shard, the sample's key and what is wrong.
    """
    first_of_kind: dict[str, str] = {}
    for shard in map(os.fspath, shards):
        samples: dict[str, set[str]] = {}
        size = os.path.getsize(shard)
        key = None
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, extension = os.path.basename(member.name).partition(".")
                    if member.offset_data + member.size > size:
                        raise ValueError(
                            f"{shard}: the shard is cut off: sample {key!r} ({member.name}) ends at byte "
                            f"{member.offset_data + member.size}, the file has {size}; write it again"
                        )
                    if not member.isfile() or not extension:
                        continue
                    samples.setdefault(os.path.join(os.path.dirname(member.name), key), set()).add(extension)
                    if extension == "json":
                        image_id = _sample_image_id(shard, key, tar.extractfile(member).read())
                        kind = "integers" if isinstance(image_id, int) else "strings"
                        first_of_kind.setdefault(kind, f"{os.path.basename(shard)} sample {key!r} has {image_id!r}")
                end = tar.offset
        except tarfile.TarError as error:
            raise ValueError(f"{shard}: not a whole tar archive ({error}); the shard is cut off or damaged: write it again") from None
        # tarfile stops quietly at a header cut in two; a whole archive ends with two zero blocks after its last file.
        with open(shard, "rb") as handle:
            handle.seek(end)
            marker = handle.read(2 * tarfile.BLOCKSIZE)
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
            raise ValueError(
                f"{shard}: the shard is cut off after sample {key!r} (at byte {end} of {size}, where a whole archive "
                "has its end marker or the next file); write it again"
            )
        for key, extensions in samples.items():
            for extension in SAMPLE_FILES:
                if extension not in extensions:
                    raise ValueError(
                        f"{shard}: sample {key!r} has no .{extension} file (it has {', '.join(sorted(extensions))}); each "
                        "sample needs {key}.jpg, {key}.txt and {key}.json with its image_id (write_webdataset_shards "
                        "writes them)"
                    )
        if len(first_of_kind) > 1:
            raise ValueError(
                f"image ids mix strings and integers: {first_of_kind['strings']}, {first_of_kind['integers']}; read as "
                "one column they would merge or fail to convert. Give every image id the same type"
            )


def _sample_image_id(shard: str, key: str, data: bytes) -> Any:
    """The ``image_id`` of a sample's ``.json`` bytes: an integer or a string."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{shard}: sample {key!r} has a .json that is not JSON ({error})") from None
    image_id = record.get(IMAGE_ID_COLUMN) if isinstance(record, dict) else None
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise ValueError(
            f"{shard}: sample {key!r} has a .json holding {record!r}, without an integer or string {IMAGE_ID_COLUMN!r}"
        )
    return image_id


def load_training_stream(
    data_args: Any, train: datasets.Dataset, seed: int = 42, buffer_size: int = 1000
) -> datasets.IterableDataset:
    """The training split as a stream (``IterableDataset``), for ``DataArguments.streaming``.

    ``train`` is the map-style training split, on which the teacher features were computed. When ``train_file`` is a
    folder of WebDataset shards, the shards are read as a stream (:func:`load_webdataset_shards`): rows of images
    that ``train`` does not hold (validation images held out with ``validation_images``) are skipped,
    ``max_train_samples`` is applied, and ``train``'s feature columns are joined by image id and caption
    (:func:`cusa_hf.teachers.image_tables.join_feature_tables`). Other sources stream ``train`` itself
    (``to_iterable_dataset``; per-image tables are joined by the collator). Rows are shuffled with a buffer of
    ``buffer_size`` (and the shard order), reseeded every epoch. Training from it needs ``max_steps``.

    Example:
        >>> splits = load_splits(data_args)                   # map-style, for the teachers and evaluation
        >>> splits["train"] = add_teacher_features(splits["train"], ...)
        >>> splits["train"] = load_training_stream(data_args, splits["train"], seed=42)
    """
    source = Path(data_args.train_file)
    if not is_webdataset_folder(source):
        return train.to_iterable_dataset().shuffle(seed=seed, buffer_size=buffer_size)
    stream = load_webdataset_shards(source, streaming=True)
    kept = set(train[IMAGE_ID_COLUMN])
    stream = stream.filter(lambda image_id: image_id in kept, input_columns=[IMAGE_ID_COLUMN])
    if data_args.max_train_samples is not None:
        stream = stream.take(data_args.max_train_samples)
    if read_feature_provenance(train):
        stream = join_feature_tables(stream, train)
    return stream.shuffle(seed=seed, buffer_size=buffer_size)
