"""Offline teacher features: CUSA's frozen image and text teachers, computed once and stored as dataset columns.

The CUSA authors run the text teacher at every training step and read image-teacher features from undocumented
``.npy`` files. :func:`add_teacher_features` instead encodes every *unique* image and caption once (COCO: five
captions per image, so five times fewer image-teacher passes than one per row), and returns the dataset with the
``teacher_text_embeds`` list column, a ``teacher_image_embeds_index`` column into a per-image table of
``teacher_image_embeds`` (one row per image, :func:`image_feature_tables`), and a ``teacher_provenance`` column
recording which teachers made them, so training pays nothing for the teachers.

Modules:
    * :mod:`.registry`: :class:`TeacherEncoder` and the loaders (:func:`load_image_teacher`,
      :func:`load_text_teacher`, ``offline:`` aliases, weights hashing);
    * :mod:`.feature_cache`: deduplicated encoding, sharding across processes, the cached Arrow tables, provenance
      and :func:`check_teacher_features` (shared with :mod:`cusa_hf.frozen_towers`);
    * :mod:`.features`: :func:`add_teacher_features` and :func:`reuse_or_add_teacher_features`;
    * :mod:`.cli`: the ``cusa-extract-teachers`` console script.

Example:
    >>> from cusa_hf.teachers import add_teacher_features, check_teacher_features
    >>> train = add_teacher_features(train, image_teacher="offline:efficientnet-lite2",
    ...                              text_teacher="offline:all-MiniLM-L6-v2")
    >>> check_teacher_features(train)["teacher_text_embeds"]["dim"]
    384
"""

from .cli import main
from .checks import check_teacher_features
from .feature_cache import (
    STORAGE_DTYPES,
    FeatureCacheOptions,
    FeatureColumns,
    FeatureSource,
    add_feature_columns,
    shard_batches,
)
from .image_tables import (
    ImageFeatureTable,
    feature_width,
    has_feature_column,
    image_feature_tables,
    index_column,
    join_feature_tables,
    save_with_feature_tables,
    with_image_features_in_rows,
)
from .provenance import (
    IMAGE_FEATURE_COLUMN,
    PER_IMAGE_LAYOUT,
    PROVENANCE_COLUMN,
    PROVENANCE_FORMAT,
    TEXT_FEATURE_COLUMN,
    read_teacher_provenance,
)
from .features import add_teacher_features, reuse_or_add_teacher_features
from .registry import (
    IMAGE_POOLINGS,
    OFFLINE_TEACHERS,
    TeacherEncoder,
    load_image_teacher,
    load_text_teacher,
    processor_json,
    weights_sha256,
)

__all__ = [
    "IMAGE_FEATURE_COLUMN",
    "IMAGE_POOLINGS",
    "OFFLINE_TEACHERS",
    "PER_IMAGE_LAYOUT",
    "PROVENANCE_COLUMN",
    "PROVENANCE_FORMAT",
    "STORAGE_DTYPES",
    "TEXT_FEATURE_COLUMN",
    "FeatureCacheOptions",
    "FeatureColumns",
    "FeatureSource",
    "ImageFeatureTable",
    "TeacherEncoder",
    "add_feature_columns",
    "add_teacher_features",
    "check_teacher_features",
    "feature_width",
    "has_feature_column",
    "image_feature_tables",
    "index_column",
    "join_feature_tables",
    "load_image_teacher",
    "load_text_teacher",
    "main",
    "processor_json",
    "read_teacher_provenance",
    "reuse_or_add_teacher_features",
    "save_with_feature_tables",
    "shard_batches",
    "weights_sha256",
    "with_image_features_in_rows",
]
