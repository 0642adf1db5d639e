"""How teacher (and frozen-tower) features record what made them: the column names, the provenance format, and
reading the provenance back from a dataset's features (see :mod:`cusa_hf.teachers.feature_cache`)."""

from __future__ import annotations

import json
from typing import Any

import datasets

from ..schema import PROVENANCE_COLUMN

# Bumped when the stored layout or the meaning of a recorded field changes; part of the cache fingerprint.
# /1 stored image features in every caption row; /2 stores them once per image (datasets of /1 still train).
PROVENANCE_FORMAT = "cusa-teacher-features/2"
# Provenance field naming the layout of an image column written by format /2.
PER_IMAGE_LAYOUT = "per_image"


def read_feature_provenance(dataset: datasets.Dataset, provenance_column: str = PROVENANCE_COLUMN) -> dict[str, Any]:
    """The recorded teacher metadata (``{"format", "teachers": {column: {...}}}``), or ``{}`` when absent (also for a
    stream of unknown features)."""
    feature = (dataset.features or {}).get(provenance_column)
    if feature is None:
        return {}
    if not isinstance(feature, datasets.ClassLabel) or len(feature.names) != 1:
        raise ValueError(f"column {provenance_column!r} is not a cusa-hf teacher provenance column: {feature!r}")
    try:
        return json.loads(feature.names[0])
    except json.JSONDecodeError as error:
        raise ValueError(f"column {provenance_column!r} holds unreadable provenance ({error})") from None
