"""CUSA backbone adapter for X2-VLM, and the ITM scorer that reranks an evaluation split as the original does.

Features handed to ``CusaModel`` are the **unnormalised** 256-d ITC projections ``vision_proj(image[:, 0])`` and
``text_proj(text[:, 0])``; ``CusaModel`` L2-normalises them, so with ``cross_projection=False`` (the default for
backbones with their own loss) CSA acts on exactly the similarities X2-VLM ranks with (``docs/fusion_backbones.md``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...backbones import BackboneFeatures, backbone_of, register_backbone_adapter
from ...evaluation.eval_view import RetrievalEvalView, encode_eval_view_images
from ..fusion_adapter import FusionAdapter, ItmScorer
from .modeling_x2vlm import X2VlmModel


class X2VlmItmScorer(ItmScorer):
    """ITM scores of (image index, text index) pairs of an evaluation split, for ``cusa_hf.evaluation.reranking.rerank_with_itm``.

    Encodes every image to its `(1 + N, D)` sequence and every caption (padded to ``max_length`` as the original's
    evaluation) to its text-encoder sequence once, keeps them on ``device`` in ``dtype``, and scores pairs with the
    fusion encoder + ITM head: the raw match logit, as ``Retrieval.py``. Memory: `n_images * (1 + N) * D` values
    (COCO 5K, base, fp32: 8.9 GB; pass ``dtype=torch.bfloat16`` to halve it).
    """

    backbone_class = X2VlmModel

    def __init__(self, model: X2VlmModel, image_sequences: torch.Tensor, text_sequences: torch.Tensor,
                 attention_mask: torch.Tensor):
        self.model = model
        self.image_sequences = image_sequences
        self.text_sequences = text_sequences
        self.attention_mask = attention_mask

    @classmethod
    def encode(
        cls, backbone: X2VlmModel, processor: Any, eval_view: RetrievalEvalView, device: torch.device,
        batch_size: int = 64, text_batch_size: int = 256, max_length: int | None = None,
        dtype: torch.dtype | None = None, show_progress: bool = True,
    ) -> X2VlmItmScorer:  # fmt: skip
        max_length = max_length or backbone.config.max_text_length

        def image_sequence(pixel_values: torch.Tensor) -> torch.Tensor:
            return backbone.get_image_sequence(pixel_values).to(dtype or backbone.dtype)

        images = encode_eval_view_images(eval_view, processor.image_processor, image_sequence, device, backbone.dtype,
                                         batch_size, show_progress, desc="ITM image sequences")  # fmt: skip
        texts, masks = [], []
        for start in tqdm(range(0, len(eval_view.captions), text_batch_size), desc="ITM text sequences",
                          disable=not show_progress):
            tokens = processor.tokenizer(list(eval_view.captions[start : start + text_batch_size]),
                                         padding="max_length", truncation=True, max_length=max_length,
                                         return_tensors="pt").to(device)
            texts.append(backbone.get_text_sequence(tokens["input_ids"], tokens["attention_mask"]).to(dtype or backbone.dtype))
            masks.append(tokens["attention_mask"])
        return cls(backbone, images, torch.cat(texts), torch.cat(masks))

    @torch.inference_mode()
    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """`(n,)` float32 match logits of pairs ``(image_idx[i], text_idx[i])``."""
        device = self.image_sequences.device
        image_idx, text_idx = image_idx.to(device), text_idx.to(device)
        # Rerank batches repeat one image (i2t) many times: project each distinct image's keys/values once.
        distinct, image_index = torch.unique(image_idx, return_inverse=True)
        dtype = self.model.dtype
        scores = self.model.itm_score(
            self.image_sequences[distinct].to(dtype), self.text_sequences[text_idx].to(dtype),
            self.attention_mask[text_idx], image_index,
        )
        return scores.float()


@register_backbone_adapter
class X2VlmAdapter(FusionAdapter):
    """Wraps `X2VlmModel`: ITC features for CUSA, ITC + ITM (hard negatives) as the original loss, ITM reranking
    (:class:`X2VlmItmScorer`)."""

    model_types = ("x2vlm",)
    feature_dim_attribute = "embed_dim"
    scorer_class = X2VlmItmScorer
    backbone: X2VlmModel

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """`(B, embed_dim)` unnormalised ITC image features."""
        return self.backbone.get_image_features(pixel_values, normalize=False)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`(B, embed_dim)` unnormalised ITC text features."""
        return self.backbone.get_text_features(input_ids, attention_mask, normalize=False)

    def forward_features(self, pixel_values, input_ids, attention_mask=None, **kwargs) -> BackboneFeatures:
        """ITC features plus, in ``extras``, the image/text sequences and the text mask that ITM needs."""
        model = self.backbone
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if model.training:
            model.clamp_temperature_()
        image_sequence = model.get_image_sequence(pixel_values)
        text_sequence = model.get_text_sequence(input_ids, attention_mask)
        return BackboneFeatures(
            image_features=model.get_image_features(image_sequence=image_sequence, normalize=False),
            text_features=model.get_text_features(text_sequence=text_sequence, normalize=False),
            extras={"image_sequence": image_sequence, "text_sequence": text_sequence, "attention_mask": attention_mask},
        )

    def original_loss(
        self, features: BackboneFeatures, image_ids: torch.Tensor | None, gather: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``{"loss_itc", "loss_itm"}``: ITC with X2-VLM's own ``temp`` and image-id soft targets over the (gathered)
        batch, and ITM on one hard negative image and text per pair from the local batch, as ``Retrieval.py``."""
        model = self.backbone
        image_embeds = F.normalize(features.image_features, dim=-1)
        text_embeds = F.normalize(features.text_features, dim=-1)
        loss_itc = model.contrastive_loss(image_embeds, text_embeds, image_ids, gather)
        extras = features.extras
        loss_itm = model.matching_loss(
            extras["image_sequence"], extras["text_sequence"], extras["attention_mask"],
            image_embeds, text_embeds, image_ids,
        )
        return {"loss_itc": loss_itc, "loss_itm": loss_itm}

    def pair_scores(self, image_inputs: dict[str, torch.Tensor], text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(n,)` ITM match logits of aligned pairs.

        ``image_inputs``: ``{"pixel_values"}`` or ``{"image_sequence"}`` (optionally with ``"image_index"``, see
        `X2VlmModel.fuse`); ``text_inputs``: ``{"input_ids", "attention_mask"}`` or ``{"text_sequence",
        "attention_mask"}``.
        """
        model = self.backbone
        image_sequence = image_inputs.get("image_sequence")
        if image_sequence is None:
            image_sequence = model.get_image_sequence(image_inputs["pixel_values"])
        attention_mask = text_inputs.get("attention_mask")
        text_sequence = text_inputs.get("text_sequence")
        if text_sequence is None:
            input_ids = text_inputs["input_ids"]
            attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            text_sequence = model.get_text_sequence(input_ids, attention_mask)
        if attention_mask is None:
            raise ValueError("pair_scores: text_inputs with 'text_sequence' also need 'attention_mask'")
        return model.itm_score(image_sequence, text_sequence, attention_mask, image_inputs.get("image_index"))

    @property
    def k_test(self) -> int:
        """The backbone config's ``k_test`` (256 COCO, 128 Flickr30K)."""
        return self.backbone.config.k_test


def x2vlm_rerank_config(model: torch.nn.Module, processor: Any, eval_view: RetrievalEvalView, **rerank_kwargs: Any):
    """A :class:`~cusa_hf.backbones.RerankConfig` reproducing X2-VLM's evaluation of ``model`` (an ``X2VlmModel`` or a
    ``CusaModel`` wrapping one): ``k_test`` candidates in both directions (default: the model config's, 256 COCO / 128
    Flickr30K) rescored by the ITM match logit (:meth:`FusionAdapter.rerank_config`)."""
    return X2VlmAdapter(backbone_of(model, X2VlmModel)).rerank_config(processor, eval_view, **rerank_kwargs)


__all__ = ["X2VlmAdapter", "X2VlmItmScorer", "x2vlm_rerank_config"]
