"""Building what a CUSA run trains, from its :mod:`cusa_hf.arguments` and its backbone's recipe
(:mod:`cusa_hf.backbone_recipes`): the processor, the ``CusaModel`` with frozen towers and the frozen towers' cached
features.

    >>> model_args = ModelArguments(backbone="openai/clip-vit-base-patch32", freeze_vision_tower=True)
    >>> processor = build_processor(model_args)         # fails fast on a name that cannot be loaded
    >>> model = build_model(model_args, csa_weight=0.1, usa_weight=0.1)
"""

from __future__ import annotations

from typing import Any

from .arguments import DataArguments, ModelArguments
from .backbone_recipes import RunData, backbone_recipe
from .frozen_towers import add_image_tower_features, add_text_tower_features, freeze_tower
from .modeling_cusa import CusaModel


def build_processor(model_args: ModelArguments) -> Any:
    """The processor (``image_processor`` + ``tokenizer``) of ``model_args.backbone`` (or ``processor_name``), as its
    recipe builds it."""
    return backbone_recipe(model_args.backbone).processor(model_args)


def build_model(model_args: ModelArguments, run_data: RunData | None = None, **cusa_fields: Any) -> CusaModel:
    """A ``CusaModel`` around the backbone of ``model_args`` with fresh CUSA heads (``cusa_fields``: CusaConfig
    fields), or starting from a saved CUSA checkpoint (``CusaModel.from_backbone``), its towers frozen as
    ``freeze_vision_tower`` / ``freeze_text_tower`` say (``fresh_heads`` keeps only a checkpoint's backbone). ``run_data``: what the backbone's recipe loaded for the run
    (its ``new_backbone`` builds the backbone; needed where the backbone is shaped by the data, as a fresh SGRAF's)."""
    if run_data is not None:
        backbone = run_data.new_backbone()
    else:
        backbone = backbone_recipe(model_args.backbone).new_backbone(model_args)
    model = CusaModel.from_backbone(backbone, fresh_heads=model_args.fresh_heads, **cusa_fields)
    if model_args.freeze_vision_tower:
        freeze_tower(model.backbone.vision_model)
    if model_args.freeze_text_tower:
        freeze_tower(model.backbone.text_model)
    return model


def cache_frozen_towers(
    model: CusaModel,
    splits: dict[str, Any],
    processor: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Every split with the cached output of each frozen tower that can be cached (CLIP / dual encoders). Cached by
    dataset and tower weights: a second run with the same towers (the baseline of a comparison) reads the tables."""
    options = dict(cache_dir=data_args.teacher_cache_dir, show_progress=show_progress)
    cached = {}
    for name, split in splits.items():
        if model_args.freeze_vision_tower and model.adapter.has_separable_image_tower:
            # Once per image, in a per-image table the caption rows point into (as the teachers' image features).
            split = add_image_tower_features(
                split, model, processor.image_processor, batch_size=data_args.teacher_batch_size,
                image_root=data_args.image_root, image_table=True, **options,
            )  # fmt: skip
        if model_args.freeze_text_tower and model.adapter.has_separable_text_tower:
            split = add_text_tower_features(
                split, model, processor.tokenizer, batch_size=4 * data_args.teacher_batch_size,
                max_length=data_args.max_text_length, **options,
            )  # fmt: skip
        cached[name] = split
    return cached
