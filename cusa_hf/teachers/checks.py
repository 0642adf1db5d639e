"""Checking a dataset's teacher-feature columns before training: present, of one width, finite, and made by the
expected teachers."""

from __future__ import annotations

import warnings
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from .image_tables import _check_table_indices, image_feature_tables
from ..schema import PROVENANCE_COLUMN, TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .provenance import read_feature_provenance


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
    provenance = read_feature_provenance(dataset, provenance_column)
    recorded = provenance.get("teachers", {})
    tables = image_feature_tables(dataset, provenance_column)
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
