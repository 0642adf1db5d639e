"""Building what a CUSA run trains, from its :mod:`cusa_hf.arguments`: the backbone, its processor, the
``CusaModel`` with frozen towers, the frozen towers' cached features, and the evaluation of fusion backbones. The
built-in student is also built by hand with :func:`builtin_backbone` and :func:`builtin_processor`.

    >>> model_args = ModelArguments(backbone="openai/clip-vit-base-patch32", freeze_vision_tower=True)
    >>> check_backbone(model_args)                      # fails fast on a name that cannot be loaded
    >>> processor = build_processor(model_args)
    >>> model = build_model(model_args, csa_weight=0.1, usa_weight=0.1)
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from .arguments import DataArguments, ModelArguments
from .backbones import adapter_class_for, dual_encoder_from_towers
from .configuration_cusa import CusaConfig
from .frozen_towers import add_image_tower_features, add_text_tower_features, freeze_tower
from .modeling_cusa import CusaModel, check_model_folder
from .models.sgraf.configuration_sgraf import SGRAF_BACKBONE, SgrafConfig
from .models.sgraf.modeling_sgraf import SgrafModel
from .models.sgraf.training_data import load_sgraf_training_data
from .offline_models import (
    BUILTIN_BACKBONE,
    efficientnet_lite_student_image_processor,
    efficientnet_lite_timm_wrapper,
    minilm_path,
)


def check_backbone(model_args: ModelArguments) -> str | None:
    """Fail early (before teachers and training) on a backbone that cannot be loaded or has no adapter; returns its
    model type (``None`` for the built-in towers). A saved CUSA checkpoint is checked by the backbone it wraps."""
    if model_args.backbone == BUILTIN_BACKBONE:
        return None
    if model_args.backbone == SGRAF_BACKBONE:
        return SgrafConfig.model_type
    check_model_folder(model_args.backbone, "backbone")
    try:
        config = AutoConfig.from_pretrained(model_args.backbone)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load backbone={model_args.backbone!r}: not a local model folder and not reachable on the Hub "
            f"({str(error).splitlines()[0]})"
        ) from None
    if config.model_type == CusaConfig.model_type:
        config = config.backbone_config
    adapter_class_for(config.model_type)
    return config.model_type


def builtin_backbone(projection_dim: int = 256) -> VisionTextDualEncoderModel:
    """The built-in student's backbone (``BUILTIN_BACKBONE``), offline: the pretrained EfficientNet-Lite0 image tower
    and all-MiniLM-L6-v2 text tower installed from PyPI (``cusa_hf.offline_models``), with new projections of
    ``projection_dim``. The text tower pools (mean) and normalises as all-MiniLM-L6-v2 was trained.

    Example::

        >>> model = CusaModel.from_backbone(builtin_backbone(), tower_dropout=0.5)   # fresh CUSA heads
        >>> processor = builtin_processor()
    """
    # A sentence-transformers folder: dual_encoder_from_towers reads its pooling and normalisation.
    return dual_encoder_from_towers(efficientnet_lite_timm_wrapper(0), minilm_path(), projection_dim)


def builtin_processor() -> VisionTextDualEncoderProcessor:
    """The processor of :func:`builtin_backbone`: EfficientNet-Lite0's evaluation transform (a
    ``CLIPImageProcessor``, which saves and reloads with ``AutoProcessor``) and all-MiniLM-L6-v2's tokenizer."""
    return VisionTextDualEncoderProcessor(
        image_processor=efficientnet_lite_student_image_processor(0),
        tokenizer=AutoTokenizer.from_pretrained(str(minilm_path())),
    )


def build_processor(model_args: ModelArguments) -> Any:
    """The processor (``image_processor`` + ``tokenizer``) of ``model_args.backbone`` (or ``processor_name``)."""
    if model_args.backbone == BUILTIN_BACKBONE:
        return builtin_processor()
    return AutoProcessor.from_pretrained(model_args.processor_name or model_args.backbone)


def build_backbone(model_args: ModelArguments, sgraf_config: dict[str, Any] | None = None) -> Any:
    """The backbone: a model (built-in towers; a fresh SGRAF from ``sgraf_config``) or the name/path that
    ``CusaModel.from_backbone`` loads."""
    if model_args.backbone == SGRAF_BACKBONE:
        if sgraf_config is None:
            raise ValueError(f"backbone={SGRAF_BACKBONE!r} needs sgraf_config (the SgrafConfig fields of a fresh model)")
        return SgrafModel(SgrafConfig(**sgraf_config))
    if model_args.backbone == BUILTIN_BACKBONE:
        return builtin_backbone(model_args.projection_dim)
    return model_args.backbone


def build_model(model_args: ModelArguments, sgraf_config: dict[str, Any] | None = None, **cusa_fields: Any) -> CusaModel:
    """A ``CusaModel`` around the backbone of ``model_args`` with fresh CUSA heads (``cusa_fields``: CusaConfig
    fields), or starting from a saved CUSA checkpoint (``CusaModel.from_backbone``), its towers frozen as
    ``freeze_vision_tower`` / ``freeze_text_tower`` say; ``fresh_heads`` keeps only a checkpoint's backbone."""
    model = CusaModel.from_backbone(
        build_backbone(model_args, sgraf_config), fresh_heads=model_args.fresh_heads, **cusa_fields
    )
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


def load_sgraf_data(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> Any:
    """The region-feature datasets, tokenizer, collator and scorers of an SGR/SAF run (docs/sgraf.md): a
    :class:`~cusa_hf.models.sgraf.training_data.SgrafTrainingData`."""
    if data_args.features_dir is None:
        raise ValueError(f"backbone={model_args.backbone!r} (SGRAF) reads precomputed region features: set features_dir")
    if model_args.freeze_vision_tower or model_args.freeze_text_tower:
        raise ValueError("freeze_vision_tower / freeze_text_tower apply to dual encoders, not to SGRAF backbones")
    fresh = model_args.backbone == SGRAF_BACKBONE
    return load_sgraf_training_data(
        data_args.features_dir,
        training_args,
        saved_model=None if fresh else model_args.backbone,
        fresh_model=None if not fresh else dict(
            module_name=model_args.sgraf_module_name,
            img_dim=model_args.sgraf_img_dim,
            embed_size=model_args.sgraf_embed_size,
            word_dim=model_args.sgraf_word_dim,
            sim_dim=model_args.sgraf_sim_dim,
        ),
        vocab_file=model_args.sgraf_vocab_file,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        test_split=data_args.test_split,
        validation_images=data_args.validation_images,
        max_train_samples=data_args.max_train_samples,
        eval_protocol=data_args.eval_protocol,
    )
