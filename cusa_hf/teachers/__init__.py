"""Offline teacher features: CUSA's frozen image and text teachers, computed once and stored as dataset columns.

The CUSA authors run the text teacher at every training step and read image-teacher features from undocumented
``.npy`` files. :func:`add_teacher_features` instead encodes every *unique* image and caption once (COCO: five
captions per image, so five times fewer image-teacher passes than one per row), and returns the dataset with the
``teacher_text_embeds`` list column, a ``teacher_image_embeds_index`` column into a per-image table of
``teacher_image_embeds`` (one row per image, :func:`image_feature_tables`), and a ``teacher_provenance`` column
recording which teachers made them, so training pays nothing for the teachers.

Modules (import each name from its module; the package itself defines nothing):
    * :mod:`.registry`: ``TeacherEncoder`` and the loaders (``load_image_teacher``, ``load_text_teacher``,
      ``offline:`` aliases, weights hashing);
    * :mod:`.feature_cache`: deduplicated encoding, sharding across processes and the cached Arrow tables (shared
      with :mod:`cusa_hf.frozen_towers`);
    * :mod:`.image_tables`: image features once per image (``ImageFeatureTable``, ``image_feature_tables``);
    * :mod:`.provenance`: what made each feature column (``read_feature_provenance``);
    * :mod:`.training_split`: ``check_teacher_features``, and a split as training reads it
      (``open_feature_split``, ``prepare_training_split``);
    * :mod:`.features`: ``add_teacher_features`` and ``reuse_or_add_teacher_features``.

The ``cusa-extract-teachers`` console script that drives them is :mod:`cusa_hf.teachers_cli`.

Example:
    >>> from cusa_hf import add_teacher_features, check_teacher_features
    >>> train = add_teacher_features(train, image_teacher="offline:efficientnet-lite2",
    ...                              text_teacher="offline:all-MiniLM-L6-v2")
    >>> check_teacher_features(train)["teacher_text_embeds"]["dim"]
    384
"""
