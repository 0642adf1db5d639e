"""The deduplicating feature cache: encode each unique image or caption once, give every row its feature, and store
the columns as a provenance-stamped Arrow table that a later call with the same data and encoders reads back.

Teacher features (:func:`cusa_hf.teachers.features.add_teacher_features`) and frozen student towers
(:mod:`cusa_hf.frozen_towers`) both go through :func:`add_feature_columns`, each describing its encoder as a
:class:`FeatureSource`.

Provenance (what made the features) lives in the dataset's *features*, the one part of a dataset that
``map``/``filter``/``select``, ``save_to_disk`` and ``push_to_hub`` (Parquet schema and README YAML) all keep:

* the embedding columns are fixed-length lists, ``List(Value("float32"), length=dim)``, so the dimension is part of
  the schema;
* image features live **once per image**: in a per-image table (an Arrow file next to the cached rows, one row per
  image, with its ``image_id``) that caption rows point into through a small ``<column>_index`` column
  (:func:`index_column`); :func:`image_feature_tables` opens the tables a dataset refers to, and the collator and the
  evaluation view join them to caption rows. Text features stay one per caption row;
* a ``teacher_provenance`` column is a ``ClassLabel`` whose single class name is a JSON document with each encoder's
  name or path, revision, pooling, dimension, normalisation, storage dtype and a SHA-256 of its weights. Its values
  are all 0 (8 bytes a row, compressed away in Parquet). ``dataset.info.description`` was rejected: Parquet files and
  Hub pushes drop it.

:func:`check_teacher_features` reads it back at training start and checks columns, dimensions and NaNs.

Example:
    >>> source = FeatureSource("text", encode=lambda texts: torch.ones(len(texts), 4), fingerprint="ones-v1",
    ...                        label="text encoder (ones)", description={"kind": "callable", "name_or_path": "ones"})
    >>> rows = add_feature_columns(rows, [source], FeatureColumns(), FeatureCacheOptions(batch_size=16))
    >>> rows.features["teacher_text_embeds"]
    List(Value('float32'), length=4)
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..images import BadImageError, load_image
from ..schema import first_row_per_image, is_caption
from .image_tables import index_column
from ..schema import MODALITIES, PROVENANCE_COLUMN, TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .provenance import PER_IMAGE_LAYOUT, PROVENANCE_FORMAT, read_feature_provenance

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("float32", "float16")
# Cached-table column naming why a row's image failed (null when it did not); never part of the returned dataset.
_ERROR_COLUMN = "_cusa_image_error"
# A loader of batch inputs: indices -> (inputs, the indices they belong to, {index: error} for inputs that failed).
BatchLoader = Callable[[Sequence[int]], tuple[list, list[int], dict[int, str]]]


@dataclass(frozen=True)
class FeatureSource:
    """An encoder of one modality as the feature cache sees it.

    Attributes:
        modality: ``"image"`` (encodes ``PIL.Image`` lists) or ``"text"`` (encodes ``str`` lists).
        encode: list of `n` inputs -> `(n, dim)` float tensor.
        fingerprint: identifies the weights and preprocessing; part of the cache key.
        label: names the encoder in progress bars and errors, e.g. ``"image teacher (offline:efficientnet-lite0)"``.
        description: the provenance fields recorded for its column (``kind``, ``name_or_path``, ``revision``,
            ``pooling``, ``weights_sha256``, ...); :meth:`provenance` adds modality, width, normalisation and dtype.
    """

    modality: str
    encode: Callable[[list], torch.Tensor]
    fingerprint: str
    label: str
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")

    def provenance(self, dim: int, normalized: bool, dtype: str) -> dict[str, Any]:
        """What the provenance column records for a ``dim``-wide column of this encoder's features."""
        return {"modality": self.modality, **self.description, "dim": dim, "normalized": normalized, "dtype": dtype}


@dataclass(frozen=True)
class FeatureColumns:
    """Where the inputs are read and the features written.

    Attributes:
        image_column: images (``datasets.Image`` or file paths, absolute or relative to ``image_root``).
        caption_column: captions.
        image_id_column: groups rows showing one image; without it rows are grouped by image path.
        image_root: folder that relative image paths are resolved against.
        image_feature_column, text_feature_column: the output columns of image and text features.
        provenance_column: the output ``ClassLabel`` column holding the provenance JSON.
    """

    image_column: str = "image"
    caption_column: str = "caption"
    image_id_column: str = "image_id"
    image_root: str | os.PathLike | None = None
    image_feature_column: str = TEACHER_IMAGE_COLUMN
    text_feature_column: str = TEACHER_TEXT_COLUMN
    provenance_column: str = PROVENANCE_COLUMN

    def input_column(self, modality: str) -> str:
        return self.image_column if modality == "image" else self.caption_column

    def output_column(self, modality: str) -> str:
        return self.image_feature_column if modality == "image" else self.text_feature_column

    def check(self, dataset: datasets.Dataset, modalities: Sequence[str]) -> None:
        """Raise ``ValueError`` when the dataset is not map-style, an input column of ``modalities`` is missing or
        an output column (or its per-image index column) exists."""
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(
                f"the feature cache needs a map-style datasets.Dataset, got {type(dataset).__name__}: compute the "
                "features on the map-style data and join them to the stream with "
                "cusa_hf.teachers.image_tables.join_feature_tables(stream, features) (frozen towers of a streamed run: "
                "cache_frozen_towers=False)"
            )
        for column in (self.input_column(modality) for modality in modalities):
            if column not in dataset.column_names:
                raise ValueError(f"the dataset has no {column!r} column; its columns are {dataset.column_names}")
        for column in (self.output_column(modality) for modality in modalities):
            if column in dataset.column_names or index_column(column) in dataset.column_names:
                raise ValueError(
                    f"the dataset already has a {column!r} column; remove it or choose another output name"
                )


@dataclass(frozen=True)
class FeatureCacheOptions:
    """How feature columns are computed, stored and cached.

    Attributes:
        batch_size: inputs per forward pass.
        normalize: L2-normalise the features (in float32, before the cast); ``False`` stores the raw output.
        dtype: storage dtype, ``"float32"`` or ``"float16"``.
        skip_bad_images: drop rows whose image cannot be read and report them in a warning, instead of raising
            ``BadImageError``.
        cache_dir: folder of the cached feature tables; defaults to the dataset's cache folder, or
            ``$HF_DATASETS_CACHE/cusa_hf_teachers`` for in-memory datasets. With caching disabled
            (``datasets.disable_caching()``) and no ``cache_dir``, nothing is reused.
        load_from_cache_file: reuse a table computed earlier for the same data, encoders and options.
        show_progress: tqdm progress bars (local main process only).
        image_table: store image features once per image, in a per-image table that rows point into
            (``index_column``); ``False`` stores them in every row, where ``dataset[i]`` shows them directly.

    Example:
        >>> FeatureCacheOptions(batch_size=32, dtype="float16", cache_dir="/tmp/features")
    """

    batch_size: int = 64
    normalize: bool = True
    dtype: str = "float32"
    skip_bad_images: bool = False
    cache_dir: str | os.PathLike | None = None
    load_from_cache_file: bool = True
    show_progress: bool = True
    image_table: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


def add_feature_columns(
    dataset: datasets.Dataset,
    sources: Sequence[FeatureSource],
    columns: FeatureColumns = FeatureColumns(),
    options: FeatureCacheOptions = FeatureCacheOptions(),
) -> datasets.Dataset:
    """Add one feature column per source to a one-row-per-caption dataset, each unique input encoded once.

    Rows are grouped by image id (else image path) for image sources and by exact caption for text sources. The
    result is cached as ``cusa-teachers-<fingerprint>.arrow``, keyed by the dataset's fingerprint, the column names,
    each source's fingerprint, ``options.normalize``/``dtype``/``skip_bad_images`` and the provenance already
    present; a second call with the same key reads that file and runs no forward pass.

    Under ``accelerate launch`` with N processes, each process encodes a contiguous share of whole batches
    (:func:`shard_batches`); the shares are gathered so that every process returns the same dataset, identical to a
    one-process run.

    Args:
        dataset: the rows; see :class:`FeatureColumns` for the columns read.
        sources: at most one per modality.
        columns: input and output column names.
        options: batch size, storage and caching.

    Image features are stored once per image, in a per-image table (``<cache file>-images.arrow``: the features and
    the image ids) that rows point into through ``index_column(column)``; :func:`image_feature_tables` opens it.

    Returns:
        the input dataset plus, per text source, a `(dim,)` list column (``columns.output_column("text")``), per
        image source an int32 index column into its per-image table (``index_column(columns.output_column("image"))``),
        and the provenance column, in the input's row order minus rows whose image could not be read (with
        ``options.skip_bad_images``).

    Raises:
        BadImageError: an image cannot be read (the message names the file and the row), unless skipped.
        ValueError: a column is missing or already present, or a source returns no `(n, dim)` tensor.
    """
    from accelerate import PartialState

    modalities = [source.modality for source in sources]
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"give at most one source per modality, got modalities {modalities}")
    columns.check(dataset, modalities)
    state = PartialState()
    previous = read_feature_provenance(dataset, columns.provenance_column)
    cache_file = _cache_file(dataset, sources, columns, options, previous)
    # Without a shared cache entry every process writes its own uniquely named temporary tables.
    row_file = cache_file or Path(datasets.fingerprint.get_temporary_cache_files_directory()) / (
        f"cusa-teachers-{uuid.uuid4().hex}.arrow"
    )
    image_file = row_file.with_name(f"{row_file.stem}-images.arrow")
    has_images = "image" in modalities and options.image_table
    table = None
    if cache_file is not None and options.load_from_cache_file and row_file.is_file() and (
        image_file.is_file() or not has_images
    ):
        logger.info("loading teacher features from the cache %s", cache_file)
        table = _read_cached_table(row_file, image_file if has_images else None)
    if table is None:
        row_columns, image_tables, dropped = _encode_feature_columns(dataset, sources, columns, options, state)
        recorded = dict(previous.get("teachers", {}))
        for source in sources:
            column = columns.output_column(source.modality)
            if column in row_columns:
                dim = row_columns[column].shape[1]
                recorded[column] = source.provenance(dim, options.normalize, options.dtype)
                continue
            vectors, image_ids = image_tables[column]
            recorded[column] = {
                **source.provenance(vectors.shape[1], options.normalize, options.dtype),
                "layout": PER_IMAGE_LAYOUT,
                "index_column": index_column(column),
                "table_file": str(image_file),
                "num_images": len(vectors),
            }
            _write_image_table(column, vectors, columns.image_id_column, image_ids, dataset, image_file, cache_file, state)
        provenance = {"format": PROVENANCE_FORMAT, "teachers": recorded, "skipped_image_rows": len(dropped)}
        table = _write_feature_table(row_columns, dropped, provenance, columns.provenance_column, row_file, cache_file, state)
    return _join_feature_table(dataset, table, columns.provenance_column)


def _read_cached_table(row_file: Path, image_file: Path | None) -> datasets.Dataset | None:
    """The cached per-row table, once it and its per-image table read whole; ``None``, with a warning naming the
    file, when one does not (cut off while written or copied): the features are then computed again and the entry
    rewritten."""
    table = None
    for path in (row_file, image_file):
        if path is None:
            continue
        try:
            opened = datasets.Dataset.from_file(str(path))
        except (OSError, ValueError, pa.ArrowException) as error:
            warnings.warn(f"{path}: the feature cache file is damaged ({error}); computing the features again", stacklevel=3)
            return None
        table = opened if path == row_file else table
    return table


def shard_batches(num_batches: int, num_processes: int, process_index: int) -> range:
    """The contiguous run of batch numbers that process ``process_index`` encodes.

    Whole batches are shared out (the first ``num_batches % num_processes`` processes get one more), so every batch is
    the same set of inputs as in a one-process run: features come out identical, not merely close.

    Example:
        >>> [shard_batches(5, 2, index) for index in range(2)]
        [range(0, 3), range(3, 5)]
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    base, extra = divmod(num_batches, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (1 if process_index < extra else 0))


def _encode_unique(
    source: FeatureSource, num_items: int, load_batch: BatchLoader, options: FeatureCacheOptions, state: Any
) -> tuple[np.ndarray, dict[int, str]]:
    """Encode items ``0..num_items-1`` in batches shared out between processes; every process gets all features,
    a `(num_items, dim)` float32 array (NaN rows for failed inputs), and ``{index: error}``.

    Errors are gathered before raising, so one process's bad image cannot leave the others waiting in a collective.
    """
    batch_size = options.batch_size
    num_batches = (num_items + batch_size - 1) // batch_size
    mine = shard_batches(num_batches, state.num_processes, state.process_index)
    pieces: list[tuple[list[int], np.ndarray]] = []
    failures: dict[int, str] = {}
    progress = tqdm(
        mine, desc=source.label, unit="batch", disable=not (options.show_progress and state.is_local_main_process)
    )
    with torch.inference_mode():
        for batch_number in progress:
            indices = range(batch_number * batch_size, min((batch_number + 1) * batch_size, num_items))
            inputs, loaded, batch_failures = load_batch(indices)
            failures.update(batch_failures)
            if batch_failures and not options.skip_bad_images:
                break
            if not inputs:
                continue
            features = source.encode(inputs)
            if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != len(inputs):
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                raise ValueError(
                    f"the {source.label} returned {shape} for {len(inputs)} inputs; expected a (n, dim) tensor"
                )
            pieces.append((loaded, features.float().cpu().numpy()))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(pieces, failures)])
        pieces = [piece for process_pieces, _ in gathered for piece in process_pieces]
        failures = {index: message for _, process_failures in gathered for index, message in process_failures.items()}
    if failures and not options.skip_bad_images:
        first = min(failures)
        raise BadImageError(f"{failures[first]} (pass skip_bad_images=True to drop such rows and report them)")
    dims = {features.shape[1] for _, features in pieces}
    if len(dims) > 1:
        raise ValueError(f"the {source.label} returned varying dims {sorted(dims)}")
    dim = dims.pop() if dims else 0
    table = np.full((num_items, dim), np.nan, dtype=np.float32)
    for loaded, features in pieces:
        table[loaded] = features
    return table, failures


def _image_keys(dataset: datasets.Dataset, image_column: str, image_id_column: str) -> tuple[list[Any], bool]:
    """One key per row naming its image (the image id, else the path, else the row) and whether keys are ids."""
    if image_id_column in dataset.column_names:
        return dataset[image_id_column], True
    if not isinstance(dataset.features[image_column], datasets.Image):
        return dataset[image_column], False
    struct = dataset.with_format("arrow").select_columns([image_column])[image_column]
    paths = [path for chunk in struct.chunks for path in chunk.field("path").to_pylist()]
    return [path if path else ("row", row) for row, path in enumerate(paths)], False


def _unique_images(
    dataset: datasets.Dataset, columns: FeatureColumns
) -> tuple[np.ndarray, list[Any] | None, int, BatchLoader]:
    """Each row's unique-image index, the unique images' ids (``None`` without an id column), their number, and a
    loader of unique images by index."""
    image_column, image_id_column = columns.image_column, columns.image_id_column
    keys, keys_are_ids = _image_keys(dataset, image_column, image_id_column)
    undecoded = dataset.select_columns([image_column])
    paths = None
    if isinstance(undecoded.features[image_column], datasets.Image):
        undecoded = undecoded.cast_column(image_column, datasets.Image(decode=False))
    elif keys_are_ids:
        paths = undecoded[image_column]  # one id naming two files is refused
    first_row = first_row_per_image(keys, paths, id_column=image_id_column)
    index_of = {key: index for index, key in enumerate(first_row)}
    first_rows = list(first_row.values())
    row_to_unique = np.array([index_of[key] for key in keys], dtype=np.int64)

    def load_images(indices: Sequence[int]) -> tuple[list, list[int], dict[int, str]]:
        rows = [first_rows[index] for index in indices]
        images, loaded, failures = [], [], {}
        for index, row, value in zip(indices, rows, undecoded.select(rows)[image_column]):
            try:
                images.append(load_image(value, columns.image_root, where=f"row {row}"))
                loaded.append(index)
            except BadImageError as error:
                failures[index] = str(error)
        return images, loaded, failures

    return row_to_unique, (list(first_row) if keys_are_ids else None), len(first_rows), load_images


def _unique_captions(dataset: datasets.Dataset, caption_column: str) -> tuple[np.ndarray, int, BatchLoader]:
    """Each row's unique-caption index, the number of unique captions, and a loader of unique captions by index.
    Unique captions are numbered longest first, so each batch pads to similar lengths; the order depends only on
    the data."""
    captions = dataset[caption_column]
    for row, caption in enumerate(captions):
        if not is_caption(caption):
            raise ValueError(f"row {row}: empty or non-text caption {caption!r} in column {caption_column!r}")
    distinct = sorted(dict.fromkeys(captions), key=len, reverse=True)
    position_of = {caption: position for position, caption in enumerate(distinct)}
    row_to_unique = np.array([position_of[caption] for caption in captions], dtype=np.int64)

    def load_captions(indices: Sequence[int]) -> tuple[list, list[int], dict[int, str]]:
        return [distinct[index] for index in indices], list(indices), {}

    return row_to_unique, len(distinct), load_captions


def _encode_feature_columns(
    dataset: datasets.Dataset,
    sources: Sequence[FeatureSource],
    columns: FeatureColumns,
    options: FeatureCacheOptions,
    state: Any,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, list[Any] | None]], dict[int, str]]:
    """The per-row arrays ``{column: array}`` (text features `(num_rows, dim)`, indices into the per-image tables
    `(num_rows,)`), the per-image tables ``{column: ((num_images, dim) features, image ids or None)}`` and
    ``{row: error}`` for rows whose image failed."""
    row_columns: dict[str, np.ndarray] = {}
    image_tables: dict[str, tuple[np.ndarray, list[Any] | None]] = {}
    dropped: dict[int, str] = {}
    for source in sources:
        column = columns.output_column(source.modality)
        if source.modality == "image":
            row_to_unique, image_ids, num_unique, load_batch = _unique_images(dataset, columns)
        else:
            row_to_unique, num_unique, load_batch = _unique_captions(dataset, columns.caption_column)
        unique, failures = _encode_unique(source, num_unique, load_batch, options, state)
        for row in np.nonzero(np.isin(row_to_unique, list(failures)))[0].tolist():
            dropped[row] = failures[int(row_to_unique[row])]
        if options.normalize:
            unique = F.normalize(torch.from_numpy(unique), dim=-1).numpy()
        unique = unique.astype(options.dtype)
        if source.modality == "text" or not options.image_table:
            row_columns[column] = unique[row_to_unique]
            continue
        # Images that failed leave the table; their rows are dropped, so their index (-1) is never read.
        encoded = np.ones(num_unique, dtype=bool)
        encoded[list(failures)] = False
        position = np.where(encoded, np.cumsum(encoded) - 1, -1).astype(np.int32)
        row_columns[index_column(column)] = position[row_to_unique]
        kept_ids = None if image_ids is None else [image_id for image_id, kept in zip(image_ids, encoded) if kept]
        image_tables[column] = (unique[encoded], kept_ids)
    return row_columns, image_tables, dropped


def _cache_location(dataset: datasets.Dataset, cache_dir: str | os.PathLike | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir)
    if not datasets.is_caching_enabled():
        return None
    if dataset.cache_files:
        return Path(dataset.cache_files[0]["filename"]).parent
    return Path(datasets.config.HF_DATASETS_CACHE) / "cusa_hf_teachers"


def _cache_file(
    dataset: datasets.Dataset,
    sources: Sequence[FeatureSource],
    columns: FeatureColumns,
    options: FeatureCacheOptions,
    previous: dict[str, Any],
) -> Path | None:
    """The cache entry of these features, or ``None`` when caching is off. Its name is a fingerprint of everything
    the features depend on; the layout of this list is frozen, since tables written earlier are found by it."""
    location = _cache_location(dataset, options.cache_dir)
    if location is None:
        return None
    fingerprint = datasets.fingerprint.Hasher.hash(
        [
            PROVENANCE_FORMAT,
            dataset._fingerprint,
            [
                columns.image_column,
                columns.caption_column,
                columns.image_id_column,
                str(columns.image_root) if columns.image_root else None,
            ],
            [(source.modality, source.fingerprint) for source in sources],
            [columns.image_feature_column, columns.text_feature_column, columns.provenance_column],
            options.normalize,
            options.dtype,
            options.skip_bad_images,
            previous,
            *(["rows"] if not options.image_table else []),
        ]
    )
    return location / f"cusa-teachers-{fingerprint}.arrow"


def _write_feature_table(
    columns: dict[str, np.ndarray],
    dropped: dict[int, str],
    provenance: dict[str, Any],
    provenance_column: str,
    path: Path,
    cache_file: Path | None,
    state: Any,
) -> datasets.Dataset:
    """Write the per-row columns (features, per-image indices, provenance, image errors) as an Arrow file (the cache
    entry) and open it memory-mapped."""
    num_rows = len(next(iter(columns.values())))
    arrays: dict[str, Any] = dict(columns)
    features = datasets.Features({name: _feature_of(array) for name, array in columns.items()})
    arrays[provenance_column] = np.zeros(num_rows, dtype=np.int64)
    features[provenance_column] = datasets.ClassLabel(names=[json.dumps(provenance, sort_keys=True)])
    if dropped:
        arrays[_ERROR_COLUMN] = [dropped.get(row) for row in range(num_rows)]
        features[_ERROR_COLUMN] = datasets.Value("string")
    return _write_arrow(arrays, features, path, cache_file is not None, state)


def _write_image_table(
    column: str,
    vectors: np.ndarray,
    image_id_column: str,
    image_ids: list[Any] | None,
    dataset: datasets.Dataset,
    path: Path,
    cache_file: Path | None,
    state: Any,
) -> datasets.Dataset:
    """Write a per-image table: `(num_images, dim)` features and, when the data has them, the image ids."""
    arrays: dict[str, Any] = {column: vectors}
    features = datasets.Features({column: _feature_of(vectors)})
    if image_ids is not None:
        arrays[image_id_column] = image_ids
        features[image_id_column] = dataset.features[image_id_column]
    return _write_arrow(arrays, features, path, cache_file is not None, state)


def _feature_of(array: np.ndarray) -> Any:
    """The ``datasets`` feature of a `(n, dim)` feature array or a `(n,)` index array."""
    if array.ndim == 2:
        return datasets.List(datasets.Value(str(array.dtype)), length=array.shape[1])
    return datasets.Value(str(array.dtype))


def _write_arrow(
    arrays: dict[str, Any], features: datasets.Features, path: Path, shared: bool, state: Any
) -> datasets.Dataset:
    """Write columns of equal length (2-d arrays as fixed-size lists) to ``path`` in chunks and open it
    memory-mapped. A ``shared`` file is written by the main process while the others wait; otherwise each process
    writes its own."""
    if state.is_main_process or not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        num_rows = len(next(iter(arrays.values())))
        chunk = 8192
        with datasets.arrow_writer.ArrowWriter(features=features, path=str(scratch)) as writer:
            for start in range(0, num_rows, chunk):
                pieces = [_arrow_array(arrays[name][start : start + chunk]) for name in features]
                writer.write_table(pa.Table.from_arrays(pieces, names=list(features)))
            writer.finalize()
        os.replace(scratch, path)
    state.wait_for_everyone()
    return datasets.Dataset.from_file(str(path))


def _arrow_array(values: Any) -> pa.Array:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.array(values)


def _join_feature_table(dataset: datasets.Dataset, table: datasets.Dataset, provenance_column: str) -> datasets.Dataset:
    """The dataset with the table's columns (replacing its provenance column), minus the rows whose image failed,
    which a warning reports."""
    base = dataset.remove_columns([provenance_column]) if provenance_column in dataset.column_names else dataset
    errors = list(table[_ERROR_COLUMN]) if _ERROR_COLUMN in table.column_names else None
    if errors is not None:
        table = table.remove_columns([_ERROR_COLUMN])
    result = datasets.concatenate_datasets([base, table], axis=1)
    if errors is None:
        return result
    dropped_rows = [row for row, error in enumerate(errors) if error is not None]
    shown = "; ".join(dict.fromkeys(errors[row] for row in dropped_rows[:50]))
    warnings.warn(
        f"skipped {len(dropped_rows)} row(s) whose image could not be read (rows {dropped_rows[:10]}"
        f"{' ...' if len(dropped_rows) > 10 else ''}): {shown}. The other {len(result) - len(dropped_rows)} rows "
        "keep their order.",
        stacklevel=4,
    )
    return result.select([row for row, error in enumerate(errors) if error is None])
