"""SigLIP and SigLIP 2 backbones (``transformers.SiglipModel`` / ``Siglip2Model``): registered adapters.

Their features are what ``get_image_features`` / ``get_text_features`` return: each tower's attention-pooling (image)
or last-token (text) head output, with no further projection, so a tower's cached output is already the feature and
its "projection" is the identity. Their own contrastive term is the sigmoid loss, with the trained ``logit_scale`` /
``logit_bias`` of the checkpoint (``CusaConfig.itc_loss`` defaults to ``"sigmoid"`` for them). Captions are padded to
64 tokens as their processors do: the text tower pools the last position, so the padding is part of the input.

Imported by ``modeling_cusa`` (and so copied into every checkpoint), which registers the adapters.
"""

from __future__ import annotations

from typing import Any

import torch

from .backbones import BackboneAdapter, register_backbone_adapter

#: The caption length SigLIP and SigLIP 2 were trained with (their processors pad every caption to it).
SIGLIP_CAPTION_LENGTH = 64


@register_backbone_adapter
class SiglipAdapter(BackboneAdapter):
    """``transformers.SiglipModel``: pooled vision and text head outputs, scored by the sigmoid term."""

    model_types = ("siglip",)
    default_itc_loss = "sigmoid"
    text_padding = "max_length"
    trained_caption_length = SIGLIP_CAPTION_LENGTH
    has_separable_image_tower = True
    has_separable_text_tower = True

    # Used (and trained) only by the sigmoid term, which CusaModel unfreezes.
    backbone_scalar_names = ("logit_scale", "logit_bias")

    @property
    def image_feature_dim(self) -> int:
        return self.backbone.config.vision_config.hidden_size

    @property
    def text_feature_dim(self) -> int:
        text_config = self.backbone.config.text_config
        return getattr(text_config, "projection_size", None) or text_config.hidden_size

    def own_contrastive_scalars(self, itc_loss: str) -> dict[str, torch.nn.Parameter]:
        if itc_loss != "sigmoid":
            return {}
        return {"itc_logit_scale": self.backbone.logit_scale, "itc_logit_bias": self.backbone.logit_bias}

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.encode_image_tower(pixel_values, **kwargs)

    def image_tower(self) -> torch.nn.Module:
        return self.backbone.vision_model

    @property
    def image_tower_dim(self) -> int:
        return self.image_feature_dim

    def encode_image_tower(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """The vision tower's pooled head output (``get_image_features(...).pooler_output``); ``kwargs`` may hold
        :attr:`image_input_names` (SigLIP 2's NaFlex ``pixel_attention_mask`` and ``spatial_shapes``), the rest of a
        batch's keys are ignored."""
        inputs = {name: kwargs[name] for name in self.image_input_names if kwargs.get(name) is not None}
        return self.backbone.vision_model(pixel_values=pixel_values, **inputs).pooler_output

    def project_image_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        return tower_features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.encode_text_tower(input_ids, attention_mask)

    def text_tower(self) -> torch.nn.Module:
        return self.backbone.text_model

    @property
    def text_tower_dim(self) -> int:
        return self.text_feature_dim

    def encode_text_tower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def project_text_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        return tower_features


@register_backbone_adapter
class Siglip2Adapter(SiglipAdapter):
    """``transformers.Siglip2Model``: as SigLIP, with NaFlex images (patches at their native aspect ratio, padded to
    the processor's ``max_num_patches``: the image processor's ``pixel_attention_mask`` and ``spatial_shapes`` travel
    with ``pixel_values`` through the collator, the frozen-tower cache and evaluation)."""

    model_types = ("siglip2",)
    image_input_names = ("pixel_attention_mask", "spatial_shapes")
