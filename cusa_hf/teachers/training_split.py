"""A split as training and evaluation read it: its feature provenance read once, the per-image tables its rows point
into opened, its teacher columns checked, and its rows joined to their images' features as batches are drawn.

* :func:`open_feature_split`: a :class:`FeatureSplit` (the dataset, its recorded provenance, its per-image tables);
* :func:`check_teacher_features`: a dataset's teacher columns present, of one width, finite, inside their per-image
  tables and made by the expected teachers;
* :func:`prepare_training_split`: a training split with both done and its feature columns read as numpy (what
  ``CusaTrainer`` does once, when it is built);
* :meth:`FeatureSplit.collate_with`: a collator that receives rows with their features in them, so collators know
  nothing of how features are stored.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc

from ..schema import PROVENANCE_COLUMN, TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .image_tables import ImageFeatureTable, open_image_tables
from .provenance import read_feature_provenance


@dataclasses.dataclass
class FeatureSplit:
    """A dataset with what its feature columns are.

    Attributes:
        dataset: the rows (a ``datasets.Dataset`` or a stream).
        provenance: the recorded provenance (``read_feature_provenance``), read once.
        feature_tables: ``{column: ImageFeatureTable}``, the per-image tables the rows point into.
    """

    dataset: Any
    provenance: dict[str, Any]
    feature_tables: dict[str, ImageFeatureTable]

    def recorded(self, column: str) -> dict[str, Any]:
        """The provenance recorded for a feature column (``{}`` when none)."""
        return self.provenance.get("teachers", {}).get(column, {})

    def has_feature_column(self, column: str) -> bool:
        """Whether rows carry ``column``'s features, in the row or through an index into its per-image table."""
        return column in self.feature_tables or column in (self.dataset.column_names or [])

    def feature_width(self, column: str) -> int:
        """The width of a feature column: of its per-image table, else of the first row."""
        if column in self.feature_tables:
            return self.feature_tables[column].dim
        first_row = self.dataset[0] if isinstance(self.dataset, datasets.Dataset) else next(iter(self.dataset))
        return len(first_row[column])

    def join(self, rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """Rows with each per-image column's features joined in through its index column."""
        for table in self.feature_tables.values():
            if rows and table.index_column in rows[0]:
                rows = table.join(rows)
        return rows

    def collate_with(self, collator: Any) -> Any:
        """``collator``, given rows whose per-image features are joined in first (itself when there are no tables)."""
        return TableJoiningCollator(collator, self) if self.feature_tables else collator


class TableJoiningCollator:
    """A collator given rows with their per-image features joined in (its other attributes are the wrapped
    collator's, which the trainer and evaluator read: column names, ``image_root``, ``max_length``)."""

    def __init__(self, collator: Any, split: FeatureSplit):
        self.collator = collator
        self.split = split

    def __call__(self, rows: Sequence[dict[str, Any]]) -> Any:
        return self.collator(self.split.join(rows))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["collator"], name)


def open_feature_split(dataset: Any, provenance_column: str = PROVENANCE_COLUMN) -> FeatureSplit:
    """The :class:`FeatureSplit` of ``dataset``: its provenance read and its per-image tables opened, once."""
    provenance = read_feature_provenance(dataset, provenance_column)
    return FeatureSplit(dataset, provenance, open_image_tables(dataset, provenance))


@dataclasses.dataclass
class TrainingSplit(FeatureSplit):
    """A :class:`FeatureSplit` checked for training.

    Attributes:
        teacher_dims: ``{"image": width, "text": width}`` of the checked teacher columns (``None``: not checked).
        teacher_info: ``{column: provenance}`` of the checked teacher columns that record one (``None``: none).
    """

    teacher_dims: dict[str, int] | None = None
    teacher_info: dict[str, Any] | None = None


def prepare_training_split(
    dataset: Any,
    *,
    needs_teachers: bool,
    teacher_image_column: str = TEACHER_IMAGE_COLUMN,
    teacher_text_column: str = TEACHER_TEXT_COLUMN,
    expected_dims: dict[str, int | None] | None = None,
    numpy_columns: Sequence[str] = (),
) -> TrainingSplit:
    """The training split as ``CusaTrainer`` trains on it, prepared once.

    Args:
        dataset: the training rows (map-style or a stream).
        needs_teachers: CSA or USA is on: the teacher columns must be present, of one width, finite, inside their
            per-image tables, and of ``expected_dims`` (``{"image": ..., "text": ...}``, ``None`` entries unchecked).
        teacher_image_column, teacher_text_column: the teacher columns (the collator's names).
        numpy_columns: feature columns the collator stacks, read as numpy arrays (turning every float of a batch into
            a Python object first costs more than a cached-tower step); teacher columns are among them.

    Raises:
        ValueError: naming the missing column, the wrong width, the row with a NaN, or the mismatching provenance.
    """
    split = open_feature_split(dataset)
    teacher_dims = teacher_info = None
    if needs_teachers and dataset.column_names is not None:
        for column in (teacher_image_column, teacher_text_column):
            if not split.has_feature_column(column):
                raise ValueError(
                    f"CSA/USA are on but the training dataset has no {column!r} column (columns: {dataset.column_names}). "
                    "Compute the teacher features once with cusa_hf.add_teacher_features(dataset, image_teacher=..., "
                    "text_teacher=...) or the cusa-extract-teachers CLI, or train the baseline with use_csa=False, "
                    "use_usa=False."
                )
        expected = {modality: {"dim": dim} for modality, dim in (expected_dims or {}).items() if dim is not None}
        checked = _check_teacher_columns(split, teacher_image_column, teacher_text_column, expected or None)
        teacher_dims = {"image": split.feature_width(teacher_image_column), "text": split.feature_width(teacher_text_column)}
        teacher_info = {column: info for column, info in checked.items() if info} or None
    columns = [column for column in (teacher_image_column, teacher_text_column, *numpy_columns)
               if column in (dataset.column_names or [])]  # fmt: skip
    if isinstance(dataset, datasets.Dataset) and columns and dataset.format["type"] is None:
        dataset = dataset.with_format("numpy", columns=list(dict.fromkeys(columns)), output_all_columns=True)
    return TrainingSplit(dataset, split.provenance, split.feature_tables, teacher_dims, teacher_info)


def check_teacher_features(
    dataset: datasets.Dataset,
    image_column: str | None = TEACHER_IMAGE_COLUMN,
    text_column: str | None = TEACHER_TEXT_COLUMN,
    expected: dict[str, dict[str, Any]] | None = None,
    provenance_column: str = PROVENANCE_COLUMN,
) -> dict[str, Any]:
    """Check a dataset's teacher columns before training and return their recorded provenance.

    Checks that each named column exists, holds lists of one length (the schema length when fixed), has no null
    row and no NaN or infinite value, and agrees with the recorded dimension. ``expected`` maps ``"image"`` /
    ``"text"`` to fields that must match the provenance (e.g. ``{"text": {"name_or_path": "...", "dim": 768}}``).
    A column set to ``None`` is not checked. A per-image column is checked in its table, and its rows' indices
    must fall inside it; a stream (``IterableDataset``) is checked on its first row only.

    Returns:
        ``{column: provenance dict}`` for the checked columns (empty dicts when the dataset records none; a warning
        says so).

    Raises:
        ValueError: naming the missing column, the wrong dimension, the row with a NaN, or the mismatching field.
    """
    return _check_teacher_columns(open_feature_split(dataset, provenance_column), image_column, text_column, expected)


def _check_teacher_columns(
    split: FeatureSplit, image_column: str | None, text_column: str | None, expected: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """:func:`check_teacher_features` of a split whose provenance is read and tables opened."""
    dataset, tables = split.dataset, split.feature_tables
    recorded = split.provenance.get("teachers", {})
    result: dict[str, Any] = {}
    for modality, column in (("image", image_column), ("text", text_column)):
        if column is None:
            continue
        if column not in tables and column not in (dataset.column_names or []):
            raise ValueError(
                f"the dataset has no teacher feature column {column!r} (columns: {dataset.column_names}); run "
                "cusa_hf.teachers.features.add_teacher_features or the cusa-extract-teachers CLI first"
            )
        if column in tables:
            dim = _check_feature_values(tables[column].table, column)
            _check_table_indices(dataset, tables[column])
        elif not isinstance(dataset, datasets.Dataset):
            dim = len(next(iter(dataset))[column])
        else:
            dim = _check_feature_values(dataset, column)
        meta = recorded.get(column, {})
        if not meta:
            warnings.warn(f"column {column!r} has no recorded teacher provenance", stacklevel=2)
        elif meta.get("dim") != dim:
            raise ValueError(f"column {column!r} holds {dim}-d features but its provenance records dim {meta.get('dim')}")
        for key, value in ((expected or {}).get(modality) or {}).items():
            actual = dim if key == "dim" else meta.get(key)
            if actual != value:
                raise ValueError(
                    f"teacher column {column!r}: expected {key}={value!r} but the features were made with "
                    f"{key}={actual!r}; recompute them with the intended teacher"
                )
        result[column] = meta
    return result


def _check_feature_values(dataset: datasets.Dataset, column: str) -> int:
    """The common width of a list-of-floats column; ``ValueError`` naming the first null, short or non-finite row."""
    feature = dataset.features[column]
    fixed = getattr(feature, "length", -1)
    if not isinstance(feature, (datasets.List, datasets.LargeList)) or not isinstance(feature.feature, datasets.Value):
        raise ValueError(f"teacher column {column!r} must be a list of floats, got {feature!r}")
    dim = fixed if fixed and fixed > 0 else None
    row = 0
    for batch in dataset.with_format("arrow").select_columns([column]).iter(batch_size=8192):
        values = batch.column(column)
        if values.null_count:
            bad = row + values.is_null().to_pylist().index(True)
            raise ValueError(f"teacher column {column!r} has no features at row {bad}")
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if dim is None and len(lengths):
            dim = int(lengths[0])
        if len(lengths) and (lengths != dim).any():
            bad = row + int(np.nonzero(lengths != dim)[0][0])
            raise ValueError(f"teacher column {column!r}: row {bad} has {lengths[lengths != dim][0]} values, not {dim}")
        flat = pc.list_flatten(values).to_numpy(zero_copy_only=False).reshape(len(values), -1)
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            raise ValueError(f"teacher column {column!r}: row {row + int(np.argmin(finite))} holds NaN or infinite values")
        row += len(values)
    if dim is None:
        raise ValueError(f"teacher column {column!r} is empty")
    return dim


def _check_table_indices(dataset: Any, table: ImageFeatureTable) -> None:
    """``ValueError`` when a row of a map-style dataset points outside its per-image table (streams are not read)."""
    if not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        return
    indices = dataset.with_format("arrow").select_columns([table.index_column])[table.index_column]
    low, high = pc.min_max(indices).values()
    if indices.null_count or low.as_py() < 0 or high.as_py() >= len(table.table):
        raise ValueError(
            f"column {table.index_column!r} points outside the per-image table of {table.column!r} ({len(table.table)} "
            f"images): its values run from {low.as_py()} to {high.as_py()}"
        )
