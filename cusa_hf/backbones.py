"""Backbone adapters: the one seam between CUSA and the retrieval model it fine-tunes.

An adapter wraps a backbone ``PreTrainedModel`` and answers what ``CusaModel`` needs to know, and nothing else:

* pooled image features for ``pixel_values`` and pooled text features for ``input_ids``/``attention_mask``
  (projected by the backbone, not yet L2-normalised);
* optionally the backbone's own cross-modal similarity matrix, for models that score pairs themselves (SGRAF);
* optionally the backbone's original training loss (ITC + ITM for X2VLM/BLIP, hinge triplet for SGRAF); without it
  ``CusaModel`` uses multi-positive InfoNCE;
* optionally pairwise match scores for reranking (fusion encoders);
* optionally the split of image encoding into a vision tower and a projection, so that a frozen tower's output can
  be computed once per image and cached (``cusa_hf.frozen_towers``).

CUSA's projectors, heads and losses sit on top and never look inside the backbone. A new backbone family is one
``BackboneAdapter`` subclass registered with :func:`register_backbone_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel


@dataclass
class BackboneFeatures:
    """What one forward pass of a backbone hands to ``CusaModel``.

    Args:
        image_features: `(batch_size, image_feature_dim)` pooled, projected image features (not normalised).
        text_features: `(batch_size, text_feature_dim)` pooled, projected text features (not normalised).
        similarity: `(batch_size, batch_size)` image-by-text scores for backbones that score pairs themselves
            (``BackboneAdapter.scores_pairs_itself``); ``None`` for dual encoders, whose similarity ``CusaModel``
            computes as cosine similarity after its cross-modal projectors.
        extras: backbone-specific tensors that its ``original_loss`` needs (e.g. token sequences for ITM).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    similarity: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class BackboneAdapter:
    """Base class of backbone adapters. Subclasses set ``model_types`` and implement the feature encoders.

    The adapter holds a reference to the backbone module (which ``CusaModel`` owns as ``self.backbone``) and has
    no parameters of its own, so checkpoints contain only the backbone's and CUSA's weights.
    """

    #: ``config.model_type`` values of the backbones this adapter serves.
    model_types: tuple[str, ...] = ()
    #: True when the backbone computes the cross-modal similarity itself; CUSA then adds no cross projector.
    scores_pairs_itself: bool = False
    #: True when ``pair_scores`` gives fusion-encoder match scores for reranking.
    supports_reranking: bool = False
    #: True when ``original_loss`` returns the backbone's own loss terms; CUSA then adds no InfoNCE temperature and,
    #: unless configured otherwise, no cross projector (CSA works on the backbone's own retrieval features).
    has_original_loss: bool = False
    #: True when image features are ``project_image_tower(encode_image_tower(pixel_values))``: a frozen vision
    #: tower's output can then be cached and training skips the tower (``cusa_hf.frozen_towers``).
    has_separable_image_tower: bool = False

    def __init__(self, backbone: PreTrainedModel):
        self.backbone = backbone

    @classmethod
    def build_backbone(cls, config: PreTrainedConfig) -> PreTrainedModel:
        """A randomly initialised backbone for ``config`` (``CusaModel(config)`` calls this)."""
        return AutoModel.from_config(config)

    @classmethod
    def load_backbone(cls, name_or_path: str, **kwargs) -> PreTrainedModel:
        """A pretrained backbone from the Hub or a local folder (``CusaModel.from_backbone`` calls this)."""
        return AutoModel.from_pretrained(name_or_path, **kwargs)

    @property
    def image_feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def text_feature_dim(self) -> int:
        """Width of the text features; the image width unless the backbone projects the towers differently."""
        return self.image_feature_dim

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """`(batch_size, image_feature_dim)` pooled projected image features."""
        raise NotImplementedError

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`(batch_size, text_feature_dim)` pooled projected text features."""
        raise NotImplementedError

    def image_tower(self) -> torch.nn.Module:
        """The vision tower whose pooled output ``encode_image_tower`` returns (adapters with a separable tower)."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    @property
    def image_tower_dim(self) -> int:
        """Width of the vision tower's pooled output, the input of ``project_image_tower``."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def encode_image_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, image_tower_dim)` pooled output of the vision tower, before the backbone's projection."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def project_image_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, image_feature_dim)` image features from the vision tower's pooled output."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BackboneFeatures:
        """Features of a batch of aligned image-text pairs; fusion backbones override this to keep sequences."""
        return BackboneFeatures(
            image_features=self.encode_image(pixel_values, **kwargs),
            text_features=self.encode_text(input_ids, attention_mask, **kwargs),
        )

    def original_loss(
        self,
        features: BackboneFeatures,
        image_ids: torch.Tensor | None,
        gather: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor] | None:
        """The backbone's own fine-tuning loss terms (summed into ``loss_itc`` by ``CusaModel``).

        ``None`` (the default) means: use ``CusaModel``'s multi-positive InfoNCE over its cross-modal logits.
        ``gather`` all-gathers a per-process tensor across processes (identity in a single process).
        """
        return None

    def pair_scores(self, image_inputs: Any, text_inputs: Any) -> torch.Tensor:
        """Fusion-encoder match scores of aligned (image, text) pairs, shape `(n_pairs,)`, for reranking."""
        raise NotImplementedError(f"{type(self).__name__} has no pairwise scorer")


_ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register_backbone_adapter(adapter_class: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Register an adapter for every ``model_type`` it lists (usable as a class decorator)."""
    if not adapter_class.model_types:
        raise ValueError(f"{adapter_class.__name__}.model_types is empty: list the backbone model types it serves")
    for model_type in adapter_class.model_types:
        _ADAPTERS[model_type] = adapter_class
    return adapter_class


def adapter_class_for(model_type: str) -> type[BackboneAdapter]:
    """The adapter class registered for a backbone ``model_type``."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"No CUSA backbone adapter for model_type={model_type!r}. Supported: {sorted(_ADAPTERS)}. "
            "Register one with cusa_hf.register_backbone_adapter."
        ) from None


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def _pooled(output: Any) -> torch.Tensor:
    """The pooled tensor of a transformers ``get_*_features`` result (an output object in transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_backbone_adapter
class ClipAdapter(BackboneAdapter):
    """``transformers.CLIPModel``: projected pooled features from ``get_image_features``/``get_text_features``."""

    model_types = ("clip", "chinese_clip")
    has_separable_image_tower = True

    def __init__(self, backbone: PreTrainedModel):
        super().__init__(backbone)
        # CUSA scores with its own learnable InfoNCE temperature; the backbone's logit_scale would be a parameter
        # without gradient, which DDP rejects, so it is frozen.
        if getattr(backbone, "logit_scale", None) is not None:
            backbone.logit_scale.requires_grad_(False)

    @property
    def image_feature_dim(self) -> int:
        return self.backbone.config.projection_dim

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return _pooled(self.backbone.get_image_features(pixel_values=pixel_values))

    def image_tower(self) -> torch.nn.Module:
        return self.backbone.vision_model

    @property
    def image_tower_dim(self) -> int:
        return self.backbone.visual_projection.in_features

    # get_image_features is exactly visual_projection(vision_model(pixel_values).pooler_output) in CLIP, Chinese-CLIP
    # and VisionTextDualEncoderModel; tests/test_frozen_towers.py pins that equality.
    def encode_image_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.vision_model(pixel_values=pixel_values).pooler_output

    def project_image_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.visual_projection(tower_features)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        return _pooled(self.backbone.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


@register_backbone_adapter
class DualEncoderAdapter(ClipAdapter):
    """``transformers.VisionTextDualEncoderModel``: any vision tower (ViT, CLIP vision, a timm network through
    ``TimmWrapperModel``) with any text tower (BERT, MiniLM, ...), each followed by a linear projection."""

    model_types = ("vision-text-dual-encoder",)


def _timm_num_features(architecture: str) -> int:
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=0).num_features


def with_vision_hidden_size(vision_config: PreTrainedConfig) -> PreTrainedConfig:
    """Give a timm tower's config the ``hidden_size`` that ``VisionTextDualEncoderModel`` reads.

    ``TimmWrapperConfig`` has no ``hidden_size``; the pooled width of a timm network is its ``num_features``.
    """
    if getattr(vision_config, "hidden_size", None) is None:
        if vision_config.model_type != "timm_wrapper":
            raise ValueError(f"vision config of type {vision_config.model_type!r} has no hidden_size")
        vision_config.hidden_size = _timm_num_features(vision_config.architecture)
    return vision_config


def dual_encoder_config(
    vision_config: PreTrainedConfig, text_config: PreTrainedConfig, projection_dim: int = 512
) -> PreTrainedConfig:
    """A ``VisionTextDualEncoderConfig`` for any vision and text tower configs, timm towers included."""
    from transformers import VisionTextDualEncoderConfig

    return VisionTextDualEncoderConfig(
        vision_config=with_vision_hidden_size(vision_config).to_dict(),
        text_config=text_config.to_dict(),
        projection_dim=projection_dim,
    )


def dual_encoder_from_towers(
    vision_model: PreTrainedModel, text_model: PreTrainedModel, projection_dim: int = 512
) -> PreTrainedModel:
    """A ``VisionTextDualEncoderModel`` around pretrained towers (their weights kept; new random projections)."""
    from transformers import VisionTextDualEncoderModel

    with_vision_hidden_size(vision_model.config)
    config = dual_encoder_config(vision_model.config, text_model.config, projection_dim)
    return VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model)
