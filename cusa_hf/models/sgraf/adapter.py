"""``BackboneAdapter`` for SGR/SAF: how ``CusaModel`` drives an ``SgrafModel``.

Input mapping (what the CUSA API's names mean for this backbone):

* ``pixel_values``: precomputed region features `(batch, num_regions, img_dim)` float (``SgrafDataCollator``);
* ``input_ids``: word ids ``<start> ... <end>``, right-padded with ``<pad>`` = 0 (``SgrafTokenizer``);
* ``attention_mask``: 1 on real tokens; its row sums are the caption lengths that the GRU packs (``None``: every
  non-``<pad>`` id is a token).

``forward_features`` gives the in-batch `(batch, batch)` image-by-caption score matrix (sigmoid scores in (0, 1),
the matrix the hinge loss uses) as ``similarity``, which CSA turns into ``softmax(similarity / csa_temperature)``;
and, as image/text features for the USA heads, the visual/text self-attention globals (``usa_pooling=
"self_attention"``) or the masked means of the local embeddings (``"mean"``). ``extras`` keeps the pre-sigmoid
``sim_logits``. ``original_loss`` is the hinge triplet loss (margin, hardest negatives), per process: the scores
need every caption's word features, so they are not gathered across processes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...backbones import BackboneAdapter, BackboneFeatures, register_backbone_adapter
from .modeling_sgraf import SgrafModel, hinge_triplet_loss


@register_backbone_adapter
class SgrafAdapter(BackboneAdapter):
    model_types = ("sgraf",)
    feature_dim_attribute = "embed_size"
    scores_pairs_itself = True
    has_original_loss = True

    backbone: SgrafModel

    @classmethod
    def tokenize_captions(cls, tokenizer, captions, max_length=None):
        """Word ids padded to the batch's longest caption, never truncated: the GRU reads captions of any length
        (``max_length`` is not used)."""
        return tokenizer(list(captions), padding=cls.text_padding, return_tensors="pt")

    def _pool_image(self, image_embeds: torch.Tensor, image_global: torch.Tensor | None = None) -> torch.Tensor:
        if self.backbone.config.usa_pooling == "mean":
            return image_embeds.mean(dim=1)
        return image_global if image_global is not None else self.backbone.image_global(image_embeds)

    def _pool_text(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, text_global: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.backbone.config.usa_pooling == "mean":
            return (text_embeds * text_mask[..., None]).sum(dim=1) / text_mask.sum(dim=1, keepdim=True)
        return text_global if text_global is not None else self.backbone.text_global(text_embeds, text_mask)

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """`(batch, embed_size)` uni-modal image features from region features `(batch, num_regions, img_dim)`."""
        return self._pool_image(self.backbone.encode_image(pixel_values))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`(batch, embed_size)` uni-modal caption features."""
        text_mask = self.backbone.text_mask(input_ids, attention_mask)
        return self._pool_text(self.backbone.encode_text(input_ids, text_mask), text_mask)

    def forward_features(self, pixel_values, input_ids, attention_mask=None, **kwargs) -> BackboneFeatures:
        output = self.backbone(pixel_values, input_ids, attention_mask)
        text_mask = self.backbone.text_mask(input_ids, attention_mask)
        return BackboneFeatures(
            image_features=self._pool_image(output.image_embeds, output.image_global),
            text_features=self._pool_text(output.text_embeds, text_mask, output.text_global),
            similarity=output.sims,
            extras={"sim_logits": output.sim_logits},
        )

    def original_loss(
        self, features: BackboneFeatures, image_ids: torch.Tensor | None, gather: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        config = self.backbone.config
        loss = hinge_triplet_loss(
            features.similarity,
            config.margin,
            config.max_violation,
            image_ids if config.mask_same_image_negatives else None,
        )
        return {"loss_hinge": loss}
