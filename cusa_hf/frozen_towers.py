"""Train on a frozen vision tower's cached output instead of running the tower at every step.

When the image tower is frozen (its weights fixed, BatchNorm on running statistics), its pooled output for an image
is the same at every step and every epoch. :func:`add_image_tower_features` runs the tower once per unique image and
stores the result as an ``image_tower_features`` column; ``CusaDataCollator`` then batches that column instead of
loading and preprocessing images, and ``CusaModel`` applies only the backbone's (trainable) projection.

The cached features are the tower's eval-mode output in float32. Training on them is training through the tower
when the tower computes the same in training mode (BatchNorm frozen, no dropout or drop-path: the default CLIP,
ViT and EfficientNet-Lite towers here; :func:`add_image_tower_features` warns otherwise), up to float rounding;
under ``--bf16``/``--fp16`` the uncached tower would run in half precision instead.

The column records which tower weights made it (SHA-256 in the ``teacher_provenance`` column), and
``CusaTrainer`` refuses a column made by other weights or a model whose tower is not frozen.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import datasets
import torch

from .teachers import (
    PROVENANCE_COLUMN,
    TeacherEncoder,
    add_teacher_features,
    processor_json,
    read_teacher_provenance,
    weights_sha256,
)

IMAGE_TOWER_COLUMN = "image_tower_features"


def _separable_adapter(model: Any):
    adapter = getattr(model, "adapter", None)
    if adapter is None or not adapter.has_separable_image_tower:
        model_type = getattr(getattr(getattr(model, "config", None), "backbone_config", None), "model_type", None)
        raise ValueError(
            f"cannot cache image tower features for a {model_type!r} backbone: its adapter does not split image "
            "encoding into a vision tower and a projection (CLIP and VisionTextDualEncoder backbones do)"
        )
    return adapter


def frozen_image_tower(model: Any) -> torch.nn.Module:
    """The vision tower of a ``CusaModel``, after checking that none of its parameters is trainable."""
    tower = _separable_adapter(model).image_tower()
    trainable = [name for name, parameter in tower.named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(
            f"the vision tower has {len(trainable)} trainable parameters (first: {trainable[0]}); only a frozen "
            "tower's output can be cached. Freeze it first (requires_grad_(False); for CNN towers also freeze "
            "BatchNorm, e.g. timm.layers.freeze_batch_norm_2d)"
        )
    return tower


def _train_mode_differences(tower: torch.nn.Module) -> list[str]:
    """What makes a tower compute differently in training mode than in eval mode, as far as can be seen without
    running it: live BatchNorm, dropout modules, dropout fields of its config, timm's drop rates."""
    found, live_norms = [], []
    for name, module in tower.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            live_norms.append(name or "tower")
        elif isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"dropout {name} has p={module.p}")
        for attribute in ("drop_rate", "drop_prob"):
            if isinstance(getattr(module, attribute, None), float) and getattr(module, attribute) > 0:
                found.append(f"{name or 'tower'}.{attribute}={getattr(module, attribute)}")
        config = getattr(module, "config", None)
        for field, value in (config.to_dict().items() if hasattr(config, "to_dict") else ()):
            if "dropout" in field and isinstance(value, float) and value > 0:
                found.append(f"config.{field}={value}")  # submodules share the config: listed once
    if live_norms:
        found.insert(0, f"{len(live_norms)} BatchNorm layers are not frozen, first: {live_norms[0]}")
    return list(dict.fromkeys(found))


def image_tower_sha256(tower: torch.nn.Module) -> str:
    """SHA-256 of a tower's weights; BatchNorm's ``num_batches_tracked`` counters are bookkeeping and left out, so
    freezing BatchNorm (which drops them) does not change it."""
    return weights_sha256(tower, skip=lambda name: name.endswith("num_batches_tracked"))


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
) -> datasets.Dataset:
    """Add the pooled output of ``model``'s frozen vision tower for every row, each unique image encoded once.

    Args:
        dataset: one row per caption, with an image column (``datasets.Image`` or file paths).
        model: a ``CusaModel`` whose backbone has a separable vision tower (CLIP, VisionTextDualEncoder) with no
            trainable parameter.
        image_processor: the backbone's image processor (e.g. ``processor.image_processor``).
        column: the output column; ``CusaDataCollator`` batches it as ``image_tower_features``.

    The other arguments, the caching (by dataset fingerprint and tower weights), the sharding across processes and
    the errors on unreadable images are those of :func:`cusa_hf.teachers.add_teacher_features`.

    Returns:
        the dataset plus ``column``: `(image_tower_dim,)` float32 features per row, not normalised.
    """
    from accelerate import PartialState

    tower = frozen_image_tower(model)
    differences = _train_mode_differences(tower)
    if differences:
        warnings.warn(
            f"the vision tower computes differently in training mode ({'; '.join(differences[:3])}"
            f"{'; ...' if len(differences) > 3 else ''}): cached features are its eval-mode output, while running the "
            "tower at every step would use batch statistics / dropout. Freeze BatchNorm "
            "(timm.layers.freeze_batch_norm_2d) and set dropout to 0 for the cache to match uncached training",
            stacklevel=2,
        )
    adapter = model.adapter
    sha = image_tower_sha256(tower)
    # The model usually still sits on the CPU here (the Trainer moves it later): encode on this process's accelerator.
    device = torch.device(device) if device is not None else PartialState().device
    home = next(iter(tower.parameters())).device

    def encode(images: list) -> torch.Tensor:
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        was_training = tower.training
        tower.eval()
        try:
            return adapter.encode_image_tower(pixel_values)
        finally:
            tower.train(was_training)

    name = getattr(getattr(tower, "config", None), "_name_or_path", None) or type(tower).__name__
    encoder = TeacherEncoder(
        modality="image",
        kind="frozen vision tower",
        name_or_path=name,
        revision=None,
        pooling="pooler_output, before the backbone's projection",
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, processor_json(image_processor)]),
        details={
            "weights_sha256": sha,
            "architecture": type(tower).__name__,
            "image_processor_sha256": _processor_sha256(image_processor),
        },
        progress_label=f"frozen image tower ({name})",
    )
    tower.to(device)
    try:
        return add_teacher_features(
            dataset,
            image_teacher=encoder,
            batch_size=batch_size,
            image_column=image_column,
            image_id_column=image_id_column,
            image_root=image_root,
            image_feature_column=column,
            normalize=False,
            device=device,
            skip_bad_images=skip_bad_images,
            cache_dir=cache_dir,
            load_from_cache_file=load_from_cache_file,
            show_progress=show_progress,
        )
    finally:
        tower.to(home)


def _processor_sha256(image_processor: Any) -> str:
    return hashlib.sha256(processor_json(image_processor).encode("utf-8")).hexdigest()


def check_image_tower_features(
    model: Any,
    dataset: datasets.Dataset | datasets.IterableDataset,
    column: str = IMAGE_TOWER_COLUMN,
    image_processor: Any = None,
    provenance_column: str = PROVENANCE_COLUMN,
) -> None:
    """Fail before training when a dataset's cached tower features cannot stand in for ``model``'s vision tower:
    the backbone has no separable tower, the tower is trainable, the width differs, or other weights (or, when
    ``image_processor`` is given, other preprocessing than evaluation will use) made them."""
    tower = frozen_image_tower(model)
    first_row = dataset[0] if isinstance(dataset, datasets.Dataset) else next(iter(dataset))
    width = len(first_row[column])
    expected = model.adapter.image_tower_dim
    if width != expected:
        raise ValueError(f"column {column!r} holds {width}-d features; this model's vision tower gives {expected}-d")
    recorded = read_teacher_provenance(dataset, provenance_column).get("teachers", {}).get(column, {})
    made_with = recorded.get("weights_sha256")
    if made_with is None:
        raise ValueError(
            f"column {column!r} records no tower weights; compute it with cusa_hf.add_image_tower_features so its "
            "provenance can be checked"
        )
    current = image_tower_sha256(tower)
    if made_with != current:
        raise ValueError(
            f"column {column!r} was computed with other vision tower weights (sha256 {made_with[:12]}..., this model's: "
            f"{current[:12]}...); recompute it with add_image_tower_features(dataset, model, ...)"
        )
    processed_with = recorded.get("image_processor_sha256")
    if image_processor is not None and processed_with is not None and processed_with != _processor_sha256(image_processor):
        raise ValueError(
            f"column {column!r} was computed with another image preprocessing than this trainer's processor (which "
            "evaluation uses); recompute it with add_image_tower_features(dataset, model, processor.image_processor)"
        )
