"""What the adapters of fusion encoders share (BLIP, X2-VLM: ITC features for retrieval and an ITM head that scores a
pair from both modalities' token sequences): they train with their own loss, and rerank an evaluation split's
dual-encoder top-k with an :class:`ItmScorer` that encodes the split once."""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import BackboneAdapter, RerankConfig, backbone_of
from ..evaluation.eval_view import RetrievalEvalView


class ItmScorer:
    """ITM scores of (image index, text index) pairs of an evaluation split, for
    ``cusa_hf.evaluation.reranking.rerank_with_itm``: built once per split by :meth:`from_eval_view`, called with
    aligned index tensors. Subclasses set :attr:`backbone_class` and implement :meth:`encode` and ``__call__``."""

    #: The backbone whose ITM head scores (a ``CusaModel`` wrapping one is accepted too).
    backbone_class: type

    @classmethod
    @torch.inference_mode()
    def from_eval_view(
        cls, model: torch.nn.Module, processor: Any, eval_view: RetrievalEvalView, device: Any = None, **options: Any
    ) -> ItmScorer:
        """The scorer of ``eval_view``, whose images and captions the backbone of ``model`` encodes once, in eval mode,
        on ``device`` (default: the backbone's); ``options``: those of the subclass's :meth:`encode` (batch sizes,
        caption length, ...)."""
        backbone = backbone_of(model, cls.backbone_class).eval()
        device = torch.device(device) if device is not None else next(backbone.parameters()).device
        return cls.encode(backbone, processor, eval_view, device, **options)

    @classmethod
    def encode(cls, backbone: Any, processor: Any, eval_view: RetrievalEvalView, device: torch.device, **options: Any):
        raise NotImplementedError


class FusionAdapter(BackboneAdapter):
    """Base of the fusion-encoder adapters: the backbone's own loss (``original_loss``: ITC + ITM) and ITM reranking
    with :attr:`scorer_class`. Subclasses set it, ``model_types`` and ``feature_dim_attribute``, and :attr:`k_test`."""

    supports_reranking = True
    has_original_loss = True
    #: The :class:`ItmScorer` of this backbone.
    scorer_class: type[ItmScorer]

    @property
    def k_test(self) -> int:
        """Candidates rescored per query by default (the backbone's own evaluation setting)."""
        raise NotImplementedError

    def rerank_config(
        self, processor: Any, eval_view: RetrievalEvalView, k_test: int | None = None, batch_size: int = 128,
        **scorer_kwargs: Any,
    ) -> RerankConfig:  # fmt: skip
        """Rerank ``eval_view`` as the backbone's own evaluation does: each query's top ``k_test`` candidates in both
        directions (``None``: :attr:`k_test`) rescored by :attr:`scorer_class`, ``batch_size`` pairs per call;
        ``scorer_kwargs``: the scorer's ``from_eval_view`` options."""
        scorer = self.scorer_class.from_eval_view(self.backbone, processor, eval_view, **scorer_kwargs)
        k = k_test or self.k_test
        return RerankConfig(itm_score=scorer, k_i2t=k, k_t2i=k, batch_size=batch_size)
