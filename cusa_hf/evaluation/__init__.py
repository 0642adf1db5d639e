"""Evaluation of image-text retrieval models: R@K / RSUM, ITM reranking, ECCV Caption, uni-modal metrics, encoding.

Protocols (each matches the definition the CUSA paper reports; see ``docs/evaluation.md``):

* **COCO 5K / Flickr30K 1K R@K** (:func:`retrieval_metrics`, module ``metrics``): image-to-text rank = best rank
  among all the image's captions, text-to-image rank = rank of the caption's one image; R@K = percentage of queries
  with rank < K; RSUM = sum of the six recalls. Ties are pessimistic by default.
* **Fusion reranking** (:func:`rerank_with_itm`, module ``reranking``): the X2VLM/BLIP protocol, dual-encoder top-k
  then ITM rescoring; :func:`pairwise_similarity` fills the matrix of backbones that score pairs themselves (SGRAF).
* **ECCV Caption** (:func:`eccv_metrics`, module ``eccv``): mAP@R, R-Precision and R@1 with the extended positives of
  Chun et al. 2022.
* **Uni-modal** (module ``unimodal``): image retrieval R@1 (:func:`image_retrieval_r1`) by leave-one-out or
  query -> gallery nearest neighbour, and STS Spearman (:func:`sts_spearman`); their data loaders are in ``loaders``.

``encoding`` runs a model over a split (:func:`encode_images`, :func:`encode_texts`, :func:`evaluate_retrieval`,
:func:`evaluate_sts`, :func:`evaluate_image_retrieval`), and ``evaluator`` holds :class:`RetrievalEvaluator`, the
reusable per-split object that ``CusaTrainer.evaluate`` calls.
"""

from ..eval_view import RetrievalEvalView
from .eccv import eccv_metrics, load_eccv_positives
from .encoding import (
    encode_images,
    encode_texts,
    evaluate_image_retrieval,
    evaluate_retrieval,
    evaluate_sts,
)
from .evaluator import PairwiseScorerFactory, RerankFactory, RetrievalEvaluator
from .loaders import LabelledImages, StsData, load_labelled_images, load_sts
from .metrics import (
    RECALL_KS,
    RETRIEVAL_METRIC_NAMES,
    TIE_RULES,
    format_retrieval_table,
    recalls_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from .reranking import BlockScoreFn, ItmScoreFn, RerankConfig, pairwise_similarity, rerank_with_itm
from .unimodal import image_retrieval_r1, spearman_correlation, sts_spearman

__all__ = [
    "BlockScoreFn",
    "ItmScoreFn",
    "LabelledImages",
    "PairwiseScorerFactory",
    "RECALL_KS",
    "RETRIEVAL_METRIC_NAMES",
    "RerankConfig",
    "RerankFactory",
    "RetrievalEvalView",
    "RetrievalEvaluator",
    "StsData",
    "TIE_RULES",
    "eccv_metrics",
    "encode_images",
    "encode_texts",
    "evaluate_image_retrieval",
    "evaluate_retrieval",
    "evaluate_sts",
    "image_retrieval_r1",
    "load_eccv_positives",
    "load_labelled_images",
    "load_sts",
    "pairwise_similarity",
    "format_retrieval_table",
    "recalls_from_ranks",
    "rerank_with_itm",
    "retrieval_metrics",
    "retrieval_ranks",
    "spearman_correlation",
    "sts_spearman",
]
