"""Image features stored once per image: the per-image tables that caption rows point into by index, opening them,
saving them with a dataset, copying them back into rows, and joining them to a stream."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np

from ..schema import PROVENANCE_COLUMN
from .provenance import PER_IMAGE_LAYOUT, read_feature_provenance


def index_column(column: str) -> str:
    """The per-row column that points caption rows into the per-image table of the image-feature ``column``.

    Example:
        >>> index_column("teacher_image_embeds")
        'teacher_image_embeds_index'
    """
    return f"{column}_index"


class ImageFeatureTable:
    """The per-image table of one image-feature column, and the caption rows' column of row numbers into it.

    Attributes:
        column: the feature column (e.g. ``teacher_image_embeds``), also the table's column of `(dim,)` vectors.
        index_column: the caption rows' int32 column of table rows (``index_column(column)``).
        table: the memory-mapped ``datasets.Dataset``, one row per image: ``column`` and, when the data had image
            ids, the ids (``image_id``).

    Example:
        >>> table = image_feature_tables(train)["teacher_image_embeds"]
        >>> table.take(train[:4][table.index_column]).shape
        (4, 1280)
    """

    def __init__(self, column: str, index_column: str, table: datasets.Dataset):
        self.column = column
        self.index_column = index_column
        self.table = table
        self._vectors = table.with_format("numpy", columns=[column])

    @property
    def dim(self) -> int:
        return self.table.features[self.column].length

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """`(len(rows), dim)` float32 features of the given table rows."""
        return np.asarray(self._vectors[[int(row) for row in rows]][self.column], dtype=np.float32).reshape(-1, self.dim)

    def join(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Caption rows with their image's `(dim,)` features under ``column`` instead of ``index_column``."""
        vectors = self.take([row[self.index_column] for row in rows])
        joined = []
        for row, vector in zip(rows, vectors):
            row = {key: value for key, value in row.items() if key != self.index_column}
            row[self.column] = vector
            joined.append(row)
        return joined


def image_feature_tables(
    dataset: datasets.Dataset | datasets.IterableDataset, provenance_column: str = PROVENANCE_COLUMN
) -> dict[str, ImageFeatureTable]:
    """``{column: ImageFeatureTable}`` for every image-feature column whose rows point into a per-image table.

    A table is found where it was written (the feature cache), else next to the dataset's own files (a folder
    written by :func:`save_with_feature_tables`). Datasets of the earlier layout, with features in every row, have
    none.

    Raises:
        FileNotFoundError: a table is in neither place (the message says how to make the folder complete).
    """
    return open_image_tables(dataset, read_feature_provenance(dataset, provenance_column))


def open_image_tables(dataset: Any, provenance: dict[str, Any]) -> dict[str, ImageFeatureTable]:
    """:func:`image_feature_tables` of a dataset whose provenance the caller has read."""
    recorded = provenance.get("teachers", {})
    names = dataset.column_names or []
    return {
        column: ImageFeatureTable(column, meta["index_column"], _open_image_table(dataset, column, meta))
        for column, meta in recorded.items()
        if meta.get("layout") == PER_IMAGE_LAYOUT and meta["index_column"] in names
    }


def _open_image_table(dataset: Any, column: str, meta: dict[str, Any]) -> datasets.Dataset:
    recorded = Path(meta["table_file"])
    folders = {Path(entry["filename"]).parent for entry in getattr(dataset, "cache_files", None) or []}
    for path in [recorded, *(folder / recorded.name for folder in sorted(folders))]:
        if path.is_file():
            table = datasets.Dataset.from_file(str(path))
            if column not in table.column_names or len(table) != meta["num_images"]:
                raise ValueError(
                    f"{path} is not the per-image table of column {column!r}: it has {len(table)} rows and columns "
                    f"{table.column_names}, the provenance records {meta['num_images']} images"
                )
            return table
    raise FileNotFoundError(
        f"the per-image table of column {column!r} ({recorded.name}, {meta['num_images']} images) is neither at "
        f"{recorded} nor next to the dataset's files. Dataset.save_to_disk keeps only the caption rows: save with "
        "cusa_hf.teachers.image_tables.save_with_feature_tables(dataset, folder), or recompute the features"
    )


def save_with_feature_tables(dataset: datasets.Dataset, folder: str | os.PathLike, **save_kwargs: Any) -> None:
    """``dataset.save_to_disk(folder)`` plus a copy of every per-image feature table its rows point into, so the folder
    is complete on its own (``datasets.load_from_disk`` and ``cusa_hf.data.load_retrieval_dataset`` read it back and
    the tables are found next to the rows)."""
    dataset.save_to_disk(os.fspath(folder), **save_kwargs)
    for table in image_feature_tables(dataset).values():
        source = Path(table.table.cache_files[0]["filename"])
        shutil.copyfile(source, Path(folder) / source.name)


def with_image_features_in_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset with every per-image column's features copied into each of its rows (the layout before per-image
    tables), for places that carry no side table: ``push_to_hub``, Parquet files, collators of other packages."""
    for column, table in image_feature_tables(dataset).items():
        features = dataset.features.copy()
        del features[table.index_column]
        features[column] = table.table.features[column]
        dataset = dataset.map(
            lambda batch, table=table: {table.column: table.take(batch[table.index_column])},
            batched=True,
            remove_columns=[table.index_column],
            features=features,
            new_fingerprint=datasets.fingerprint.Hasher.hash([dataset._fingerprint, column, "in rows"]),
        )
    return dataset


def join_feature_tables(
    stream: datasets.IterableDataset,
    features: datasets.Dataset,
    caption_column: str = "caption",
    image_id_column: str = "image_id",
    provenance_column: str = PROVENANCE_COLUMN,
) -> datasets.IterableDataset:
    """A stream of caption rows with the feature columns of ``features``, the same data map-style after
    :func:`add_teacher_features` (or the frozen-tower functions): each row gets its image's row of every per-image
    table, looked up by image id, and its caption's per-caption features, looked up by caption text, as `(dim,)`
    arrays under the feature column names, with the provenance column (so the trainer checks them as usual).

    Example:
        >>> train = add_teacher_features(load_retrieval_dataset("shards/"), image_teacher=..., text_teacher=...)
        >>> stream = join_feature_tables(load_webdataset_shards("shards/", streaming=True), train)

    Raises:
        ValueError: ``features`` has no feature columns, a per-image table has no image ids, or (while streaming)
            a row's image id or caption is not in the tables.
    """
    recorded = read_feature_provenance(features, provenance_column).get("teachers", {})
    if not recorded:
        raise ValueError("`features` records no feature columns; run add_teacher_features on it first")
    tables = image_feature_tables(features, provenance_column)
    rows_of_image: dict[str, dict[Any, int]] = {}
    for column, table in tables.items():
        if image_id_column not in table.table.column_names:
            raise ValueError(
                f"the per-image table of {column!r} has no {image_id_column!r} column (its data had no image ids), so "
                "a stream cannot be joined to it by image id"
            )
        rows_of_image[column] = {image_id: row for row, image_id in enumerate(table.table[image_id_column])}
    caption_columns = [column for column in recorded if column not in tables and column in features.column_names]
    row_of_caption: dict[str, int] = {}
    for row, caption in enumerate(features[caption_column] if caption_columns else []):
        row_of_caption.setdefault(caption, row)
    per_caption = features.select_columns(caption_columns).with_format("numpy")

    def add_features(batch: dict[str, list]) -> dict[str, Any]:
        added: dict[str, Any] = {provenance_column: [0] * len(batch[caption_column])}
        for column, row_of in rows_of_image.items():
            missing = [image_id for image_id in batch[image_id_column] if image_id not in row_of]
            if missing:
                raise ValueError(
                    f"image id {missing[0]!r} of the stream is not in the per-image table of {column!r} ({len(row_of)} "
                    "images): the features must be computed on the data the stream reads"
                )
            added[column] = tables[column].take([row_of[image_id] for image_id in batch[image_id_column]])
        if caption_columns:
            missing = [caption for caption in batch[caption_column] if caption not in row_of_caption]
            if missing:
                raise ValueError(f"caption {missing[0]!r} of the stream has no {caption_columns[0]!r} features")
            vectors = per_caption[[row_of_caption[caption] for caption in batch[caption_column]]]
            added.update({column: np.asarray(vectors[column], dtype=np.float32) for column in caption_columns})
        return added

    joined_features = None
    if stream.features is not None:
        joined_features = datasets.Features(
            {
                **stream.features,
                **{column: table.table.features[column] for column, table in tables.items()},
                **{column: features.features[column] for column in caption_columns},
                provenance_column: features.features[provenance_column],
            }
        )
    return stream.map(add_features, batched=True, features=joined_features)


def has_feature_column(dataset: datasets.Dataset | datasets.IterableDataset, column: str) -> bool:
    """Whether rows carry ``column``'s features, in the row or through an index into its per-image table."""
    names = dataset.column_names or []
    if column in names:
        return True
    meta = read_feature_provenance(dataset).get("teachers", {}).get(column, {})
    return meta.get("layout") == PER_IMAGE_LAYOUT and meta["index_column"] in names
