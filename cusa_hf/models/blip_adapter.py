"""CUSA backbone adapter for transformers' ``BlipForImageTextRetrieval`` (ITC projections + ITM head), and its
ITM scorer for reranking an evaluation split.

Features handed to ``CusaModel`` are the unnormalised 256-d ITC projections ``vision_proj(vision[:, 0])`` and
``text_proj(text[:, 0])`` (text encoded without the image). The original loss is BLIP's retrieval fine-tuning loss
without its momentum encoder and queue (``docs/fusion_backbones.md``): ITC with image-id soft targets, plus ITM on one
hard negative image and text per pair drawn from ``softmax(sim / temp)`` with same-image pairs excluded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval, PreTrainedConfig, PreTrainedModel

from ..backbones import BackboneFeatures, backbone_of, register_backbone_adapter
from ..evaluation.eval_view import RetrievalEvalView, encode_eval_view_images
from .fusion_adapter import FusionAdapter, ItmScorer
from .fusion_losses import hard_negative_itm_loss, itc_loss, sample_hard_negatives

#: BLIP's ITC temperature at initialisation (``temp: 0.07`` in its retrieval configs). BLIP learns it, but the
#: transformers checkpoints of ``BlipForImageTextRetrieval`` do not carry it, so the adapter keeps it fixed; a
#: backbone config attribute ``itc_temperature`` overrides it.
BLIP_ITC_TEMPERATURE = 0.07
#: Candidates BLIP's retrieval evaluation reranks per query (``k_test``: 256 in its COCO config, 128 in Flickr30K's).
BLIP_K_TEST = 256


class BlipItmScorer(ItmScorer):
    """ITM scores of (image index, text index) pairs of an evaluation split: BLIP's ``itm[:, 1] + cosine`` (its
    retrieval evaluation adds the ITC similarity of the candidate to the ITM logit)."""

    backbone_class = BlipForImageTextRetrieval

    def __init__(self, adapter: BlipAdapter, image_sequences, image_features, input_ids, attention_mask, text_features):
        self.adapter = adapter
        self.image_sequences, self.image_features = image_sequences, image_features
        self.input_ids, self.attention_mask, self.text_features = input_ids, attention_mask, text_features

    @classmethod
    def encode(
        cls, backbone: BlipForImageTextRetrieval, processor: Any, eval_view: RetrievalEvalView, device: torch.device,
        batch_size: int = 64, text_batch_size: int = 256, max_length: int = 35, show_progress: bool = True,
    ) -> BlipItmScorer:  # fmt: skip
        """Encode every image sequence and tokenise every caption (BLIP's ``max_length`` 35) once."""
        adapter = BlipAdapter(backbone)
        sequences = encode_eval_view_images(eval_view, processor.image_processor, adapter.image_sequence, device,
                                            backbone.dtype, batch_size, show_progress, desc="ITM image sequences")
        tokens = processor.tokenizer(list(eval_view.captions), padding="longest", truncation=True,
                                     max_length=max_length, return_tensors="pt").to(device)
        text_features = torch.cat([
            adapter.encode_text(tokens["input_ids"][s : s + text_batch_size], tokens["attention_mask"][s : s + text_batch_size])
            for s in range(0, len(eval_view.captions), text_batch_size)
        ])
        image_features = backbone.vision_proj(sequences[:, 0])
        return cls(adapter, sequences, F.normalize(image_features.float(), dim=-1), tokens["input_ids"],
                   tokens["attention_mask"], F.normalize(text_features.float(), dim=-1))

    @torch.inference_mode()
    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        device = self.image_sequences.device
        image_idx, text_idx = image_idx.to(device), text_idx.to(device)
        itm = self.adapter.itm_logits(self.image_sequences[image_idx], self.input_ids[text_idx],
                                      self.attention_mask[text_idx])[:, 1].float()
        return itm + (self.image_features[image_idx] * self.text_features[text_idx]).sum(-1)


@register_backbone_adapter
class BlipAdapter(FusionAdapter):
    """Wraps ``BlipForImageTextRetrieval``: ITC features for CUSA, ITC + ITM as the original loss, ITM reranking
    (:class:`BlipItmScorer`, ``k_test`` = ``BLIP_K_TEST``)."""

    model_types = ("blip",)
    feature_dim_attribute = "image_text_hidden_size"
    k_test = BLIP_K_TEST
    scorer_class = BlipItmScorer
    backbone: BlipForImageTextRetrieval

    @classmethod
    def build_backbone(cls, config: PreTrainedConfig) -> PreTrainedModel:
        # AutoModel would build BlipModel, which has no ITM head.
        return BlipForImageTextRetrieval(config)

    @classmethod
    def load_backbone(cls, name_or_path: str, **kwargs) -> PreTrainedModel:
        return BlipForImageTextRetrieval.from_pretrained(name_or_path, **kwargs)

    @property
    def temperature(self) -> float:
        return float(getattr(self.backbone.config, "itc_temperature", BLIP_ITC_TEMPERATURE))

    def image_sequence(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 1 + N, D_vision)` vision-encoder output (CLS first), what the ITM text encoder attends to."""
        return self.backbone.vision_model(pixel_values=pixel_values).last_hidden_state

    def text_sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`(B, L, D_text)` unimodal text-encoder output (no image)."""
        return self.backbone.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.backbone.vision_proj(self.image_sequence(pixel_values)[:, 0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.backbone.text_proj(self.text_sequence(input_ids, attention_mask)[:, 0])

    def forward_features(self, pixel_values, input_ids, attention_mask=None, **kwargs) -> BackboneFeatures:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_sequence = self.image_sequence(pixel_values)
        return BackboneFeatures(
            image_features=self.backbone.vision_proj(image_sequence[:, 0]),
            text_features=self.encode_text(input_ids, attention_mask),
            extras={"image_sequence": image_sequence, "input_ids": input_ids, "attention_mask": attention_mask},
        )

    def itm_logits(self, image_sequence, input_ids, attention_mask) -> torch.Tensor:
        """`(B, 2)` ITM logits of aligned pairs, exactly ``BlipForImageTextRetrieval(use_itm_head=True)``'s."""
        image_mask = torch.ones(image_sequence.shape[:-1], dtype=torch.long, device=image_sequence.device)
        fused = self.backbone.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=image_sequence, encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.backbone.itm_head(fused[:, 0])

    def original_loss(
        self, features: BackboneFeatures, image_ids: torch.Tensor | None, gather: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``{"loss_itc", "loss_itm"}``: ITC with the fixed temperature and image-id soft targets over the (gathered)
        batch, and ITM on one hard negative image and text per pair of the local batch, drawn from
        ``softmax(sim / temp)`` without X2-VLM's ``+ 1e-5``. No momentum encoder, queue or distillation."""
        temperature = torch.tensor(self.temperature, device=features.image_features.device)
        image_embeds = F.normalize(features.image_features, dim=-1)
        text_embeds = F.normalize(features.text_features, dim=-1)
        loss_itc = itc_loss(image_embeds, text_embeds, temperature, image_ids, gather)
        negatives = sample_hard_negatives(image_embeds, text_embeds, temperature, image_ids, smoothing=0.0)
        extras = features.extras
        images, ids, mask = extras["image_sequence"], extras["input_ids"], extras["attention_mask"]

        def pair_itm_logits(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
            return self.itm_logits(images[image_index], ids[text_index], mask[text_index])

        return {"loss_itc": loss_itc, "loss_itm": hard_negative_itm_loss(pair_itm_logits, negatives)}

    def pair_scores(self, image_inputs: dict[str, torch.Tensor], text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(n,)` ITM match logits of aligned pairs; ``image_inputs``: ``{"pixel_values"}`` or ``{"image_sequence"}``,
        ``text_inputs``: ``{"input_ids", "attention_mask"}``."""
        image_sequence = image_inputs.get("image_sequence")
        if image_sequence is None:
            image_sequence = self.image_sequence(image_inputs["pixel_values"])
        input_ids = text_inputs["input_ids"]
        attention_mask = text_inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.itm_logits(image_sequence, input_ids, attention_mask)[:, 1]


def blip_rerank_config(model: torch.nn.Module, processor: Any, eval_view: RetrievalEvalView, **rerank_kwargs: Any):
    """A :class:`~cusa_hf.backbones.RerankConfig` for BLIP's evaluation of ``model`` (a ``BlipForImageTextRetrieval`` or
    a ``CusaModel`` wrapping one): ``k_test`` candidates each way (default ``BLIP_K_TEST`` = 256, COCO's; Flickr30K uses
    128), rescored by ``itm[:, 1] + cosine`` (:meth:`FusionAdapter.rerank_config`)."""
    return BlipAdapter(backbone_of(model, BlipForImageTextRetrieval)).rerank_config(processor, eval_view, **rerank_kwargs)


__all__ = ["BLIP_ITC_TEMPERATURE", "BLIP_K_TEST", "BlipAdapter", "BlipItmScorer", "blip_rerank_config"]
