"""Image-text retrieval data: loading datasets and splits as one row per caption.

Every loader returns a ``datasets.Dataset`` with one row per caption in the schema of ``cusa_hf.schema``
(``image``, ``caption``, ``image_id``); WebDataset tar shards load too, and stream (``cusa_hf.streaming``).

Row order follows the source: records in file order, and for an image with a caption list its captions in list order.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import datasets
import huggingface_hub
from tqdm.auto import tqdm

from .images import BadImageError, load_image, resolve_image_path
from .schema import (
    CAPTION_COLUMN_CANDIDATES,
    IMAGE_COLUMN,
    IMAGE_COLUMN_CANDIDATES,
    IMAGE_ID_COLUMN,
    IMAGE_ID_COLUMN_CANDIDATES,
    InvalidRecordError,
    caption_problem,
    first_row_per_image,
    normalize_image_ids,
)
from .streaming import is_webdataset_folder, load_webdataset_shards


class _RowBuilder:
    """Collects validated one-row-per-caption columns; a bad record raises or, when skipping, is recorded."""

    def __init__(self, skip_invalid: bool, check_files: bool):
        self.skip_invalid = skip_invalid
        self.check_files = check_files
        self.source_rows: list[int] = []
        self.images: list[Any] = []
        self.captions: list[str] = []
        self.image_ids: list[Any] = []
        self.skipped: list[str] = []

    def problem(self, message: str) -> None:
        if not self.skip_invalid:
            raise InvalidRecordError(message + " (pass skip_invalid=True to skip such records and report them)")
        self.skipped.append(message)

    def add(
        self,
        source_row: int,
        where: str,
        image: Any,
        image_id: Any,
        caption_value: Any,
        image_field: str,
        caption_field: str,
        image_path: str | None = None,
    ) -> None:
        """Add one record. ``image_path`` is the resolved file to check, for path-based images."""
        if image is None or (isinstance(image, str) and not image.strip()):
            self.problem(f"{where}: field {image_field!r} is missing or empty")
            return
        if image_path is not None and self.check_files and not os.path.isfile(image_path):
            self.problem(f"{where}: field {image_field!r} names a file that does not exist: {image_path}")
            return
        if image_id is None:
            self.problem(f"{where}: image id is missing")
            return
        if isinstance(caption_value, str):
            captions, labels = [caption_value], [caption_field]
        elif isinstance(caption_value, (list, tuple)) and caption_value:
            captions = list(caption_value)
            labels = [f"{caption_field}[{k}]" for k in range(len(captions))]
        else:
            self.problem(f"{where}: field {caption_field!r} must be a non-empty string or list of strings, got {caption_value!r}")
            return
        for caption, label in zip(captions, labels):
            problem = caption_problem(caption)
            if problem is not None:
                self.problem(f"{where}: field {label!r} {problem}")
                continue
            self.source_rows.append(source_row)
            self.images.append(image)
            self.captions.append(caption)
            self.image_ids.append(image_id)

    def finish(self, source: str) -> None:
        if self.skipped:
            shown = "; ".join(self.skipped[:5]) + ("; ..." if len(self.skipped) > 5 else "")
            warnings.warn(f"{source}: skipped {len(self.skipped)} invalid record(s) or caption(s): {shown}", stacklevel=3)
        if not self.captions:
            raise InvalidRecordError(f"{source}: no valid (image, caption) rows")
        self.image_ids = normalize_image_ids(self.image_ids)


def _refuse_paths_outside_root(
    paths: Sequence[Any], image_root: str | os.PathLike | None, source: str, column: str
) -> None:
    root = os.path.realpath(image_root if image_root is not None else os.curdir)
    for row, value in enumerate(paths):
        if not isinstance(value, str) or not value.strip():
            continue
        if os.path.isabs(value) or not _inside_any(os.path.join(root, value), [root]):
            raise InvalidRecordError(
                f"{source} row {row}: {column} {value!r} points outside image_root={str(image_root)!r}; images of a "
                "dataset loaded from the Hub must be relative paths inside image_root"
            )


#: URL schemes of image files that ``datasets.Image`` downloads rather than reads from this machine's disk.
REMOTE_SCHEMES = ("http", "https", "hf")


def _refuse_image_files_outside(
    paths: Sequence[str | None], roots: Sequence[str | os.PathLike], image_root: Any, source: str, column: str
) -> None:
    """Refuse the local files a ``datasets.Image`` column would read (its rows without bytes; ``None`` for the others)
    outside ``roots``. ``datasets`` opens such a path itself (a relative one from the working folder), and a
    ``file://`` or chained (``a::b``) URL from the disk as well; only Hub and HTTP addresses are downloaded."""
    for row, path in enumerate(paths):
        if not path:
            continue
        target = urlparse(path.split("::")[-1])
        if target.scheme in REMOTE_SCHEMES:
            continue
        local = target.path if target.scheme == "file" else path
        if target.scheme not in ("", "file") or not _inside_any(local, roots):
            raise InvalidRecordError(
                f"{source} row {row}: {column} reads the local file {path!r}, outside image_root={str(image_root)!r}; "
                "a dataset loaded from the Hub may read files only inside image_root (or its own downloaded files) "
                "and otherwise must carry its image bytes"
            )


def _inside_any(path: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> bool:
    resolved = os.path.realpath(path)
    return any(os.path.commonpath([os.path.realpath(root), resolved]) == os.path.realpath(root) for root in roots)


def _read_json_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save the file as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_number} is not valid JSON ({error})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if isinstance(records, dict) and isinstance(records.get("annotations"), list):
        records = records["annotations"]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (Karpathy/ALBEF format), got {type(records).__name__}")
    return records


def load_json_dataset(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_files: bool = True,
) -> datasets.Dataset:
    """Load a Karpathy/ALBEF-style JSON file (what the CUSA authors and ``coco_mini`` use) as one row per caption.

    Accepted records (a JSON list, or JSON Lines for ``.jsonl``):

    * train: ``{"image": "val2014/x.jpg", "caption": "a dog ...", "image_id": "coco_123"}``;
    * eval: ``{"image": "val2014/x.jpg", "caption": ["a dog ...", "a puppy ...", ...]}`` (one row per caption is
      produced; without ``image_id`` a record's image path is its id). Ids are given in every record or in none:
      a mix is refused, as it would split an image into two.

    Args:
        path: the JSON file.
        image_root: folder that relative image paths are resolved against; defaults to the JSON file's folder.
            Rows hold the resolved absolute paths.
        skip_invalid: skip records with a missing image or an empty caption (empty captions in a list are dropped
            one by one) and report them in one warning, instead of raising.
        check_files: also treat a path that does not exist as a missing image.

    Returns:
        ``datasets.Dataset`` with columns ``image`` (str path), ``caption`` (str), ``image_id`` (int or str), in file
        order.

    Raises:
        InvalidRecordError: naming the file, record index and field of the first bad record.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent.resolve()
    builder = _RowBuilder(skip_invalid, check_files)
    records = _read_json_records(path)
    _check_image_ids_all_given_or_all_derived(path, records)
    for index, record in enumerate(records):
        where = f"{path.name} record {index}"
        if not isinstance(record, dict):
            builder.problem(f"{where}: expected an object with 'image' and 'caption', got {type(record).__name__}")
            continue
        image = record.get("image")
        resolved = resolve_image_path(image, root) if isinstance(image, str) and image.strip() else None
        builder.add(
            index,
            where,
            image=resolved,
            image_id=record.get("image_id", image),
            caption_value=record.get("caption"),
            image_field="image",
            caption_field="caption",
            image_path=resolved,
        )
    builder.finish(str(path))
    return datasets.Dataset.from_dict(
        {"image": builder.images, "caption": builder.captions, "image_id": builder.image_ids}
    )


def _check_image_ids_all_given_or_all_derived(path: Path, records: list[Any]) -> None:
    """Refuse a file where only some records carry ``image_id``: the others' ids would be their image paths, so an
    image captioned in both kinds of record would count as two images (in training and in evaluation)."""
    objects = [(index, record) for index, record in enumerate(records) if isinstance(record, dict)]
    given = next((index for index, record in objects if "image_id" in record), None)
    derived = next((index for index, record in objects if "image_id" not in record), None)
    if given is not None and derived is not None:
        raise InvalidRecordError(
            f"{path}: only some records carry 'image_id' (record {given} has one, record {derived} has none); a "
            "missing id would be the record's image path, splitting an image into two. Give every record an "
            "'image_id', or none (each image is then identified by its path)"
        )


def _find_column(dataset: datasets.Dataset, given: str | None, candidates: Sequence[str], role: str) -> str | None:
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(f"the dataset has no {role} column {given!r}; its columns are {dataset.column_names}")
        return given
    if role == "image":
        for name, feature in dataset.features.items():
            if isinstance(feature, datasets.Image):
                return name
    return next((name for name in candidates if name in dataset.column_names), None)


def flatten_captions(
    dataset: datasets.Dataset,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_id_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_files: bool = True,
    source: str = "dataset",
    paths_within_root: bool = False,
    readable_folders: Sequence[str | os.PathLike] = (),
) -> datasets.Dataset:
    """One row per caption from a dataset with one row per image and a caption list (or one caption) per row.

    Args:
        dataset: e.g. a Flickr30k / COCO-Karpathy Hub dataset or an ``imagefolder`` with a metadata file.
        image_column: defaults to the first ``datasets.Image`` column, else the first of
            ``IMAGE_COLUMN_CANDIDATES`` present.
        caption_column: defaults to the first of ``CAPTION_COLUMN_CANDIDATES`` present.
        image_id_column: defaults to the first of ``IMAGE_ID_COLUMN_CANDIDATES`` present; without one the image's
            file path identifies it (``datasets.Image`` path, or the path string), else its source row number.
        image_root: folder that relative path strings are resolved against (path-string image columns only).
        skip_invalid, check_files: as in :func:`load_json_dataset`.
        source: a name for the dataset in error messages.
        paths_within_root: refuse path strings that are absolute or climb out of ``image_root`` (the current folder
            without one) with ``..``, and ``datasets.Image`` values without bytes whose file lies outside
            ``image_root`` and ``readable_folders``; :func:`load_hub_dataset` sets it, so a downloaded dataset cannot
            make the run read files elsewhere on the machine. A user's own JSON may use absolute paths.
        readable_folders: with ``paths_within_root``, further folders whose files a ``datasets.Image`` column may
            name (where ``datasets`` keeps the files it downloaded; the folder an ``imagefolder`` was read from).

    Returns:
        columns ``image`` (the source's image values: ``datasets.Image`` or resolved path strings), ``caption``,
        ``image_id``, in source row order. Image bytes are copied once per caption row (Arrow has no shared rows).
    """
    image_column, caption_column, image_id_column = _caption_source_columns(
        dataset, image_column, caption_column, image_id_column, source
    )
    within = [image_root if image_root is not None else os.curdir, *readable_folders] if paths_within_root else None
    image_values, resolved_paths = _image_values(dataset, image_column, image_root, source, within)
    if image_id_column is not None:
        ids = dataset[image_id_column]
    else:
        ids = [value if value is not None else row for row, value in enumerate(image_values)]
    builder = _RowBuilder(skip_invalid, check_files)
    rows = zip(image_values, ids, dataset[caption_column], resolved_paths)
    for row, (image, image_id, caption_value, path) in enumerate(rows):
        builder.add(
            row,
            f"{source} row {row}",
            image=image,
            image_id=image_id,
            caption_value=caption_value,
            image_field=image_column,
            caption_field=caption_column,
            image_path=path,
        )
    builder.finish(source)
    fingerprint = datasets.fingerprint.Hasher.hash(
        [dataset._fingerprint, image_column, caption_column, image_id_column, str(image_root), skip_invalid, check_files]
    )
    return _one_row_per_caption(dataset, image_column, builder, fingerprint)


def _caption_source_columns(
    dataset: datasets.Dataset,
    image_column: str | None,
    caption_column: str | None,
    image_id_column: str | None,
    source: str,
) -> tuple[str, str, str | None]:
    """The image, caption and (optional) image id columns of a one-row-per-image dataset: the ones given, else found
    among the usual names (:func:`flatten_captions`)."""
    image_column = _find_column(dataset, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    caption_column = _find_column(dataset, caption_column, CAPTION_COLUMN_CANDIDATES, "caption")
    if image_column is None or caption_column is None:
        raise ValueError(
            f"{source}: cannot tell which columns hold the {'image' if image_column is None else 'caption'}s; "
            f"columns are {dataset.column_names}; pass image_column= and caption_column="
        )
    return image_column, caption_column, _find_column(dataset, image_id_column, IMAGE_ID_COLUMN_CANDIDATES, "image id")


def _image_values(
    dataset: datasets.Dataset,
    image_column: str,
    image_root: str | os.PathLike | None,
    source: str,
    within: list[Any] | None,
) -> tuple[list[Any], list[str | None]]:
    """``(values, paths)`` of the image column, one per row, ``None`` for a missing image: a ``datasets.Image``
    column's paths (``row N`` for bytes without a path; no file to check), or path strings resolved against
    ``image_root`` (the files to check). ``within``: the folders the column's files must lie in (``image_root``
    first), or ``None`` to accept any path."""
    if isinstance(dataset.features[image_column], datasets.Image):
        # Only paths and presence are needed here: read the Arrow struct, never decode or copy image bytes.
        struct = dataset.with_format("arrow").select_columns([image_column])[image_column]
        paths = [path for chunk in struct.chunks for path in chunk.field("path").to_pylist()]
        present = [
            valid and (has_bytes or bool(path))
            for chunk in struct.chunks
            for valid, has_bytes, path in zip(
                chunk.is_valid().to_pylist(), chunk.field("bytes").is_valid().to_pylist(), chunk.field("path").to_pylist()
            )
        ]
        if within is not None:
            without_bytes = [
                path if valid and not has_bytes else None
                for chunk in struct.chunks
                for valid, has_bytes, path in zip(
                    chunk.is_valid().to_pylist(), chunk.field("bytes").is_valid().to_pylist(), chunk.field("path").to_pylist()
                )
            ]
            _refuse_image_files_outside(without_bytes, within, image_root, source, image_column)
        # A present image without a path (bytes only) still counts as present; its row number identifies it.
        values = [(path or f"row {row}") if ok else None for row, (path, ok) in enumerate(zip(paths, present))]
        return values, [None] * len(paths)
    raw_paths = dataset[image_column]
    if within is not None:
        _refuse_paths_outside_root(raw_paths, image_root, source, image_column)
    values = [
        resolve_image_path(value, image_root) if isinstance(value, str) and value.strip() else None for value in raw_paths
    ]
    return values, values


def _one_row_per_caption(
    dataset: datasets.Dataset, image_column: str, builder: _RowBuilder, fingerprint: str
) -> datasets.Dataset:
    """The ``image``, ``caption``, ``image_id`` columns of the rows ``builder`` collected, the images taken from
    ``dataset``'s rows (a ``datasets.Image`` column keeps its bytes, without decoding them)."""
    image_feature = dataset.features[image_column]
    is_image_feature = isinstance(image_feature, datasets.Image)
    base = dataset.select_columns([image_column])
    if is_image_feature:
        base = base.cast_column(image_column, datasets.Image(decode=False))
    base = base.select(builder.source_rows)

    def add_caption_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = {"caption": [builder.captions[i] for i in indices], "image_id": [builder.image_ids[i] for i in indices]}
        if not is_image_feature:
            rows[image_column] = [builder.images[i] for i in indices]
        return rows

    flat = base.map(
        add_caption_rows, batched=True, with_indices=True, new_fingerprint=fingerprint, desc="Flattening captions"
    )
    if image_column != "image":
        flat = flat.rename_column(image_column, "image")
    if is_image_feature:
        flat = flat.cast_column("image", datasets.Image(decode=image_feature.decode))
    return flat.select_columns(["image", "caption", "image_id"])


def load_hub_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    config_name: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_id_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    karpathy_split: str | None = None,
    split_column: str = "split",
    skip_invalid: bool = False,
    check_files: bool = True,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load a Hugging Face dataset (Hub name, local script/folder, or a builder such as ``"imagefolder"``) and flatten
    it to one row per caption with :func:`flatten_captions`.

    Args:
        name_or_path, split, config_name, revision, load_kwargs: passed to ``datasets.load_dataset``.
        karpathy_split: keep only rows whose ``split_column`` equals this value (e.g. ``"test"`` for
            ``nlphuji/flickr30k``, which ships the Karpathy splits as one split with a ``split`` column).
        image_column, caption_column, image_id_column, image_root, skip_invalid, check_files: see
            :func:`flatten_captions`.
    """
    dataset = datasets.load_dataset(name_or_path, config_name, split=split, revision=revision, **load_kwargs)
    if karpathy_split is not None:
        if split_column not in dataset.column_names:
            raise ValueError(f"{name_or_path}: no {split_column!r} column to select karpathy_split={karpathy_split!r}")
        dataset = dataset.filter(lambda value: value == karpathy_split, input_columns=[split_column])
    return flatten_captions(
        dataset,
        image_column=image_column,
        caption_column=caption_column,
        image_id_column=image_id_column,
        image_root=image_root,
        skip_invalid=skip_invalid,
        check_files=check_files,
        source=f"{name_or_path}[{split}]",
        paths_within_root=True,
        readable_folders=_downloaded_files_folders(load_kwargs.get("data_dir")),
    )


def _downloaded_files_folders(data_dir: Any) -> list[str]:
    """Where ``datasets`` keeps a loaded dataset's own image files: its download caches, and the local folder it was
    read from (``data_dir`` of an ``imagefolder``)."""
    folders = [datasets.config.DOWNLOADED_DATASETS_PATH, huggingface_hub.constants.HF_HUB_CACHE]
    if isinstance(data_dir, (str, os.PathLike)) and os.path.isdir(data_dir):
        folders.append(data_dir)
    return [os.fspath(folder) for folder in folders]


def load_imagefolder_dataset(folder: str | os.PathLike, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """An ``imagefolder`` whose ``metadata.jsonl``/``metadata.csv`` gives ``file_name`` and a caption (or caption
    list) per image, as one row per caption; ``kwargs`` as in :func:`load_hub_dataset`."""
    return load_hub_dataset("imagefolder", split=split, data_dir=os.fspath(folder), **kwargs)


def load_retrieval_dataset(
    source: str | os.PathLike,
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load whatever ``source`` names, as one row per caption.

    * a ``.json``/``.jsonl`` file: :func:`load_json_dataset`;
    * a folder written by ``Dataset.save_to_disk``: ``datasets.load_from_disk`` (flattened if captions are lists);
    * a folder of WebDataset ``.tar`` shards: :func:`load_webdataset_shards`;
    * another folder: :func:`load_imagefolder_dataset`;
    * anything else: a Hub dataset name, :func:`load_hub_dataset`.

    With ``skip_invalid`` bad records are skipped and reported, and every image is decoded once up front
    (:func:`drop_undecodable_images`), so a truncated file cannot stop training later.
    """
    path = Path(source)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        dataset = load_json_dataset(path, image_root=image_root, skip_invalid=skip_invalid, **kwargs)
    elif path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        dataset = datasets.load_from_disk(os.fspath(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        caption_feature = dataset.features.get(kwargs.get("caption_column") or "caption")
        if not (isinstance(caption_feature, datasets.Value) and image_root is None):
            dataset = flatten_captions(dataset, image_root=image_root, skip_invalid=skip_invalid, source=str(path), **kwargs)
    elif is_webdataset_folder(path):
        dataset = load_webdataset_shards(path)
    elif path.is_dir():
        dataset = load_imagefolder_dataset(path, split=split, image_root=image_root, skip_invalid=skip_invalid, **kwargs)
    else:
        dataset = load_hub_dataset(os.fspath(source), split=split, image_root=image_root, skip_invalid=skip_invalid, **kwargs)
    if skip_invalid:
        dataset = drop_undecodable_images(dataset, image_root, source=f"{source} [{split}]")
    return dataset


def drop_undecodable_images(
    dataset: datasets.Dataset,
    image_root: str | os.PathLike | None = None,
    show_progress: bool = True,
    source: str = "dataset",
) -> datasets.Dataset:
    """``dataset`` without the rows (every caption) of images that do not open and decode, reported in one warning.

    Each distinct image is decoded once, up front, so a truncated or corrupt file is found before training rather than
    when a batch reaches it. ``load_retrieval_dataset(..., skip_invalid=True)`` calls this.
    """
    if len(dataset) == 0:
        return dataset
    undecoded = dataset
    if isinstance(dataset.features.get(IMAGE_COLUMN), datasets.Image):
        undecoded = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    image_ids = dataset[IMAGE_ID_COLUMN]
    first_row = first_row_per_image(image_ids)
    bad: dict[Any, str] = {}
    for image_id, row in tqdm(first_row.items(), desc=f"Checking {source} images", disable=not show_progress):
        try:
            load_image(undecoded[row][IMAGE_COLUMN], image_root, where=f"{source} row {row}")
        except BadImageError as error:
            bad[image_id] = str(error)
    if not bad:
        return dataset
    shown = "; ".join(list(bad.values())[:5]) + ("; ..." if len(bad) > 5 else "")
    warnings.warn(f"{source}: skipped {len(bad)} image(s) that do not decode, with all their captions: {shown}", stacklevel=2)
    kept = [row for row, image_id in enumerate(image_ids) if image_id not in bad]
    if not kept:
        raise InvalidRecordError(f"{source}: no image decodes ({shown})")
    return dataset.select(kept)


def hold_out_images(dataset: datasets.Dataset, num_images: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(rest, held_out)``: the last ``num_images`` distinct images of a one-row-per-caption dataset, with all their
    captions, split off (e.g. as a validation split carved from the training data)."""
    image_ids = list(first_row_per_image(dataset["image_id"]))
    if num_images >= len(image_ids):
        raise ValueError(f"num_images={num_images} held out leaves no training images (there are {len(image_ids)})")
    held_out = set(image_ids[-num_images:])
    in_held_out = [image_id in held_out for image_id in dataset["image_id"]]
    return (
        dataset.select([row for row, flag in enumerate(in_held_out) if not flag]),
        dataset.select([row for row, flag in enumerate(in_held_out) if flag]),
    )


def load_splits(data_args: Any) -> dict[str, datasets.Dataset]:
    """The ``train`` / ``validation`` / ``test`` splits a :class:`~cusa_hf.arguments.DataArguments` names.

    ``train_file`` is required; ``validation_file`` (else ``validation_images`` held out from the training images,
    all their captions with them) and ``test_file`` are optional; ``max_train_samples`` keeps the first training
    rows. Every split is loaded with :func:`load_retrieval_dataset` (``image_root``, ``skip_invalid``) and must not
    be empty.
    """
    if data_args.train_file is None:
        raise ValueError("train_file is required: a JSON file, a save_to_disk folder, an imagefolder or a Hub dataset")

    def load(source: str, split: str) -> datasets.Dataset:
        dataset = load_retrieval_dataset(source, split=split, image_root=data_args.image_root, skip_invalid=data_args.skip_invalid)
        if len(dataset) == 0:
            raise ValueError(f"the {split} data from {source} is empty")
        return dataset

    train = load(data_args.train_file, data_args.train_split)
    splits = {"train": train}
    if data_args.validation_file:
        splits["validation"] = load(data_args.validation_file, data_args.validation_split)
    elif data_args.validation_images > 0:
        splits["train"], splits["validation"] = hold_out_images(train, data_args.validation_images)
    if data_args.test_file:
        splits["test"] = load(data_args.test_file, data_args.test_split)
    if data_args.max_train_samples is not None:
        if data_args.max_train_samples < 1:
            raise ValueError(f"max_train_samples={data_args.max_train_samples} leaves the training set empty")
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    return splits
