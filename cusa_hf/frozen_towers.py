"""Train on frozen towers' cached output instead of running the towers at every step.

When a tower is frozen (its weights fixed, BatchNorm on running statistics, dropout off: :func:`freeze_tower`), its
pooled output for an image or a caption is the same at every step and every epoch. :func:`add_image_tower_features`
runs the vision tower once per unique image and stores the result as an ``image_tower_features`` column (or, with
``image_table=True``, once per image in a per-image table that rows point into, the teachers' layout);
:func:`add_text_tower_features` does the same for the text tower, once per unique caption, as a
``text_tower_features`` column. ``CusaDataCollator`` then batches those columns instead of loading images and
tokenising captions, ``CusaModel`` applies only the backbone's (trainable) projections and the CUSA heads, and
``CusaTrainer`` evaluates a split that carries the columns the same way. With both towers frozen a training step
costs only the small trainable layers.

The cached features are the tower's eval-mode output in float32. Training on them is training through the tower
when the tower computes the same in training mode (BatchNorm frozen, no dropout or drop-path: what
:func:`freeze_tower` makes of a tower; the ``add_*`` functions warn otherwise), up to float rounding; under
``bf16`` / ``fp16`` training the uncached tower would run in half precision instead.

Each column records which tower weights made it (SHA-256 in the provenance column,
``cusa_hf.schema.PROVENANCE_COLUMN``), with the preprocessing (image processor, or tokenizer, length limit and pooling). :func:`check_tower_columns` (which
``CusaTrainer`` and ``RetrievalEvaluator`` run) refuses a column made by other weights or preprocessing, or a model
whose tower is not frozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import Any

import datasets
import torch

from .backbones import TOWER_NAMES
from .schema import IMAGE_TOWER_COLUMN, MODALITIES, TEXT_TOWER_COLUMN
from .teachers.feature_cache import FeatureCacheOptions, FeatureColumns, FeatureSource, add_feature_columns
from .teachers.training_split import FeatureSplit
from .teachers.registry import processor_json, weights_sha256


def _separable_adapter(model: Any, modality: str = "image"):
    adapter = getattr(model, "adapter", None)
    if adapter is None or not getattr(adapter, f"has_separable_{modality}_tower"):
        model_type = getattr(getattr(getattr(model, "config", None), "backbone_config", None), "model_type", None)
        raise ValueError(
            f"cannot cache {modality} tower features for a {model_type!r} backbone: its adapter does not split "
            f"{modality} encoding into a tower and a projection (CLIP and VisionTextDualEncoder backbones do)"
        )
    return adapter


def cacheable_tower(model: Any, modality: str) -> torch.nn.Module:
    """The ``"image"`` or ``"text"`` tower of a ``CusaModel`` whose output can be cached: a separable tower (split from
    its projection) with no trainable parameter (:func:`freeze_tower` makes one)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    tower = getattr(_separable_adapter(model, modality), f"{modality}_tower")()
    trainable = [name for name, parameter in tower.named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(
            f"the {TOWER_NAMES[modality]} has {len(trainable)} trainable parameters (first: {trainable[0]}); only a frozen "
            "tower's output can be cached. Freeze it first (cusa_hf.frozen_towers.freeze_tower)"
        )
    return tower


def freeze_tower(module: torch.nn.Module) -> torch.nn.Module:
    """Freeze a tower so that it computes in training mode exactly what it computes in evaluation: weights without
    gradients, BatchNorm on its running statistics (timm's ``freeze_batch_norm_2d``) and dropout off (dropout
    modules, attention-dropout rates and the config's dropout fields set to 0). Returns the module (changed in
    place; a timm tower inside a ``TimmWrapperModel`` is replaced by its frozen copy)."""
    module.requires_grad_(False)
    timm_model = getattr(module, "timm_model", None)
    if timm_model is not None:
        from timm.layers import freeze_batch_norm_2d

        module.timm_model = freeze_batch_norm_2d(timm_model)
    for submodule in module.modules():
        if isinstance(submodule, torch.nn.modules.dropout._DropoutNd):
            submodule.p = 0.0
        for attribute in _dropout_rates(submodule):
            setattr(submodule, attribute, 0.0)
    return module


def _dropout_rates(module: torch.nn.Module) -> list[str]:
    """Float attributes of a module that are dropout rates read at run time (CLIP attention's ``dropout``, timm's
    ``drop_rate`` / ``drop_prob``)."""
    return [
        attribute
        for attribute, value in vars(module).items()
        if ("dropout" in attribute or attribute in ("drop_rate", "drop_prob")) and isinstance(value, float)
    ]


def _train_mode_differences(tower: torch.nn.Module) -> list[str]:
    """What makes a tower compute differently in training mode than in eval mode, as far as can be seen without
    running it: live BatchNorm, dropout modules and dropout rates read at run time."""
    found, live_norms = [], []
    for name, module in tower.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            live_norms.append(name or "tower")
        elif isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"dropout {name} has p={module.p}")
        for attribute in _dropout_rates(module):
            if getattr(module, attribute) > 0:
                found.append(f"{name or 'tower'}.{attribute}={getattr(module, attribute)}")
    if live_norms:
        found.insert(0, f"{len(live_norms)} BatchNorm layers are not frozen, first: {live_norms[0]}")
    return list(dict.fromkeys(found))


def tower_sha256(tower: torch.nn.Module) -> str:
    """SHA-256 of a tower's weights; BatchNorm's ``num_batches_tracked`` counters are bookkeeping and left out, so
    freezing BatchNorm (which drops them) does not change it."""
    return weights_sha256(tower, skip=lambda name: name.endswith("num_batches_tracked"))


def _warn_train_mode_differences(tower: torch.nn.Module, modality: str) -> None:
    differences = _train_mode_differences(tower)
    if differences:
        warnings.warn(
            f"the {TOWER_NAMES[modality]} computes differently in training mode ({'; '.join(differences[:3])}"
            f"{'; ...' if len(differences) > 3 else ''}): cached features are its eval-mode output, while running the "
            "tower at every step would use batch statistics / dropout. Freeze it with "
            "cusa_hf.frozen_towers.freeze_tower for the cache to match uncached training",
            stacklevel=3,
        )


def _add_tower_features(
    dataset: datasets.Dataset,
    model: Any,
    modality: str,
    preprocess: Any,
    settings: dict[str, Any],
    columns: FeatureColumns,
    options: FeatureCacheOptions,
    device: str | torch.device | None,
) -> datasets.Dataset:
    """Run ``model``'s frozen ``modality`` tower once per unique input through the feature cache, into
    ``columns.output_column(modality)``. ``preprocess(inputs)`` gives the tower's keyword inputs; ``settings``
    (preprocessing) is part of the fingerprint and of the recorded provenance."""
    from accelerate import PartialState

    tower = cacheable_tower(model, modality)
    _warn_train_mode_differences(tower, modality)
    sha = tower_sha256(tower)
    # The model usually still sits on the CPU here (the Trainer moves it later): encode on this process's accelerator.
    device = torch.device(device) if device is not None else PartialState().device
    home = next(iter(tower.parameters())).device
    encode_tower = getattr(model.adapter, f"encode_{modality}_tower")

    def encode(inputs: list) -> torch.Tensor:
        was_training = tower.training
        tower.eval()
        try:
            return encode_tower(**{key: value.to(device) for key, value in preprocess(inputs).items()})
        finally:
            tower.train(was_training)

    name = getattr(getattr(tower, "config", None), "_name_or_path", None) or type(tower).__name__
    source = FeatureSource(
        modality=modality,
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, settings]),
        label=f"frozen {modality} tower ({name})",
        description={
            "kind": f"frozen {modality} tower",
            "name_or_path": name,
            "revision": None,
            "pooling": f"{settings.get('pooling', 'pooler_output')}, before the backbone's projection",
            "weights_sha256": sha,
            "architecture": type(tower).__name__,
            **_settings_digest(settings),
        },
    )
    tower.to(device)
    if modality == "image":
        # Channels-last runs depthwise convolutions (EfficientNet, MobileNet) about 1.7x faster on CPU, with the same
        # features up to float rounding; the tower is put back in the default layout afterwards.
        tower.to(memory_format=torch.channels_last)
    try:
        return add_feature_columns(dataset, [source], columns, options)
    finally:
        tower.to(home, memory_format=torch.contiguous_format)


def _settings_digest(settings: dict[str, Any]) -> dict[str, str]:
    """The recorded fingerprint of a tower's preprocessing, checked against the trainer's processor."""
    text = repr(sorted(settings.items()))
    return {"preprocessing_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _image_settings(image_processor: Any) -> dict[str, Any]:
    return {"image_processor": processor_json(image_processor)}


def _text_settings(model: Any, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    adapter = model.adapter
    return {
        "tokenizer": _tokenizer_description(tokenizer),
        "max_length": type(adapter).caption_length(tokenizer, max_length),
        "pooling": getattr(adapter, "text_pooling", "pooler"),
        "normalize": bool(getattr(adapter, "text_pooling_normalize", False)),
    }


def _tokenizer_description(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    vocab_sha = hashlib.sha256(repr(sorted(vocab.items())).encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{vocab_sha}:{getattr(tokenizer, 'do_lower_case', None)}"


def add_image_tower_features(
    dataset: datasets.Dataset,
    model: Any,
    image_processor: Any,
    batch_size: int = 64,
    *,
    image_column: str = "image",
    image_id_column: str = "image_id",
    image_root: str | os.PathLike | None = None,
    column: str = IMAGE_TOWER_COLUMN,
    device: str | torch.device | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
    show_progress: bool = True,
    image_table: bool = False,
) -> datasets.Dataset:
    """Add the pooled output of ``model``'s frozen vision tower for every row, each unique image encoded once.

    Args:
        dataset: one row per caption, with an image column (``datasets.Image`` or file paths).
        model: a ``CusaModel`` whose backbone has a separable vision tower (CLIP, VisionTextDualEncoder) with no
            trainable parameter.
        image_processor: the backbone's image processor (e.g. ``processor.image_processor``).
        column: the output column; ``CusaDataCollator`` batches it as ``image_tower_features``.
        image_table: store the features once per image, in a per-image table that rows point into through
            ``index_column(column)`` (joined by ``CusaTrainer``'s training split and the evaluation view), as teacher
            features are; by default every row holds its image's features, which ``dataset[i]`` shows.

    The other arguments, the caching (by dataset fingerprint and tower weights), the sharding across processes and
    the errors on unreadable images are those of :func:`cusa_hf.teachers.features.add_teacher_features`
    (:class:`~cusa_hf.teachers.feature_cache.FeatureColumns`,
    :class:`~cusa_hf.teachers.feature_cache.FeatureCacheOptions`).

    Returns:
        the dataset plus ``column``: `(image_tower_dim,)` float32 features per row, not normalised (with
        ``image_table``: ``index_column(column)``, each row's row in the per-image table of ``column``,
        ``cusa_hf.teachers.image_tables.image_feature_tables``).
    """

    def preprocess(images: list) -> dict[str, torch.Tensor]:
        # With every other input the tower takes (SigLIP 2's NaFlex pixel_attention_mask and spatial_shapes).
        processed = image_processor(images=images, return_tensors="pt")
        inputs = {name: processed[name] for name in ("pixel_values", *model.adapter.image_input_names)}
        if inputs["pixel_values"].ndim == 4:
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        return inputs

    columns = FeatureColumns(
        image_column=image_column, image_id_column=image_id_column, image_root=image_root, image_feature_column=column
    )
    options = FeatureCacheOptions(
        batch_size=batch_size, normalize=False, skip_bad_images=skip_bad_images, cache_dir=cache_dir,
        load_from_cache_file=load_from_cache_file, show_progress=show_progress, image_table=image_table,
    )  # fmt: skip
    return _add_tower_features(
        dataset, model, "image", preprocess, _image_settings(image_processor), columns, options, device
    )


def add_text_tower_features(
    dataset: datasets.Dataset,
    model: Any,
    tokenizer: Any,
    batch_size: int = 256,
    *,
    caption_column: str = "caption",
    max_length: int | None = None,
    column: str = TEXT_TOWER_COLUMN,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
    show_progress: bool = True,
) -> datasets.Dataset:
    """Add the pooled output of ``model``'s frozen text tower for every row, each unique caption encoded once.

    Args:
        dataset: one row per caption.
        model: a ``CusaModel`` whose backbone has a separable text tower (CLIP, VisionTextDualEncoder) with no
            trainable parameter; the tower pools as the backbone is configured (e.g. sentence-transformers mean
            pooling, see ``cusa_hf.dual_encoder_from_towers``).
        tokenizer: the backbone's tokenizer (e.g. ``processor.tokenizer``).
        max_length: truncation length; defaults to the backbone's caption length (what ``CusaDataCollator`` uses).
        column: the output column; ``CusaDataCollator`` batches it as ``text_tower_features``.

    Caching, sharding and the other arguments as in :func:`cusa_hf.teachers.features.add_teacher_features`.

    Returns:
        the dataset plus ``column``: `(text_tower_dim,)` float32 features per row (after the tower's pooling and,
        where configured, its L2 normalisation; before the backbone's projection).
    """
    tokenization = type(model.adapter)

    def preprocess(captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenization.tokenize_captions(tokenizer, captions, max_length)
        return {key: tokens[key] for key in ("input_ids", "attention_mask") if key in tokens}

    columns = FeatureColumns(caption_column=caption_column, text_feature_column=column)
    options = FeatureCacheOptions(
        batch_size=batch_size, normalize=False, cache_dir=cache_dir, load_from_cache_file=load_from_cache_file,
        show_progress=show_progress,
    )  # fmt: skip
    settings = _text_settings(model, tokenizer, max_length)
    return _add_tower_features(dataset, model, "text", preprocess, settings, columns, options, device)


def check_tower_features(
    model: Any,
    split: FeatureSplit,
    modality: str,
    column: str,
    preprocessing: Any = None,
    max_length: int | None = None,
) -> None:
    """Fail before training or evaluation when a split's cached tower features cannot stand in for ``model``'s
    ``modality`` tower: the backbone has no separable tower, the tower is trainable, the width differs, or other
    weights made them, or (when ``preprocessing`` is given: the image processor, or the tokenizer) other
    preprocessing than the trainer's. ``split``: the dataset with its provenance
    (``cusa_hf.teachers.training_split.open_feature_split``)."""
    tower = cacheable_tower(model, modality)
    width = split.feature_width(column)
    expected = getattr(model.adapter, f"{modality}_tower_dim")
    if width != expected:
        raise ValueError(f"column {column!r} holds {width}-d features; this model's {TOWER_NAMES[modality]} gives {expected}-d")
    recorded = split.recorded(column)
    made_with = recorded.get("weights_sha256")
    add = f"add_{modality}_tower_features"
    if made_with is None:
        raise ValueError(
            f"column {column!r} records no tower weights; compute it with cusa_hf.{add} so its provenance can be "
            "checked"
        )
    current = tower_sha256(tower)
    if made_with != current:
        raise ValueError(
            f"column {column!r} was computed with other {TOWER_NAMES[modality]} weights (sha256 {made_with[:12]}..., this "
            f"model's: {current[:12]}...); recompute it with {add}(dataset, model, ...)"
        )
    if preprocessing is None:
        return
    settings = _image_settings(preprocessing) if modality == "image" else _text_settings(model, preprocessing, max_length)
    processed_with = recorded.get("preprocessing_sha256")
    if processed_with is not None and processed_with != _settings_digest(settings)["preprocessing_sha256"]:
        raise ValueError(
            f"column {column!r} was computed with another {modality} preprocessing than this trainer's processor "
            f"(which evaluation uses: processor settings, length limit, pooling); recompute it with "
            f"{add}(dataset, model, ...)"
        )


def check_tower_columns(model: Any, split: FeatureSplit, collator: Any, processor: Any) -> FeatureSplit:
    """Check the cached frozen-tower columns of a split against ``model`` (weights, width, preprocessing) and
    return the split without the raw column a cached tower replaces (so images are not decoded at every step)."""
    dataset = split.dataset
    columns = getattr(dataset, "column_names", None) or []
    checks = (
        ("image", getattr(collator, "image_tower_column", None), getattr(processor, "image_processor", None),
         getattr(collator, "image_column", "image")),
        ("text", getattr(collator, "text_tower_column", None), getattr(processor, "tokenizer", None), None),
    )  # fmt: skip
    for modality, column, preprocessing, replaced in checks:
        if column is not None and split.has_feature_column(column):
            check_tower_features(
                model, split, modality, column, preprocessing, max_length=getattr(collator, "max_length", None)
            )
            if replaced in columns:
                dataset = dataset.remove_columns([replaced])
    return dataclasses.replace(split, dataset=dataset)
