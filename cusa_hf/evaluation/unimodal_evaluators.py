"""Uni-modal evaluators: STS Spearman of the text features and image retrieval R@1 of the image features (the USA
heads' by default, as the paper's uni-modal rows), as evaluator objects that ``CusaTrainer`` can call during training."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .encoding import evaluate_image_retrieval, evaluate_sts
from .evaluator import Evaluator
from .loaders import LabelledImages, StsData
from .metric_registry import MetricInfo, register_metric

register_metric(MetricInfo("sts_spearman", "STS Spearman x100", "sentence-similarity", "Semantic Textual Similarity",
                           table="uni-modal", column="sts_spearman"))  # fmt: skip
register_metric(MetricInfo("image_r1", "Image Retrieval R@1", "image-retrieval", "Image Retrieval",
                           table="uni-modal", column="image_r1"))  # fmt: skip


@dataclasses.dataclass(eq=False)
class StsEvaluator(Evaluator):
    """STS Spearman (x100) of a model's text features on sentence pairs (``cusa_hf.evaluation.loaders.load_sts``).

    Args:
        eval_data: the sentence pairs and gold scores.
        head: ``"uni"`` (the USA text head), ``"cross"`` or ``None`` (a plain backbone).
    """

    eval_data: StsData = dataclasses.field(repr=False)
    metric_key_prefix: str = "eval"
    head: str | None = "uni"
    batch_size: int = 256
    show_progress: bool = True
    primary_metric: str = "sts_spearman"

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        value = evaluate_sts(model, processor.tokenizer, self.eval_data, self.head, self.batch_size, accelerator,
                             show_progress=self.show_progress)  # fmt: skip
        return self.prefixed({"sts_spearman": value}, metric_key_prefix)


@dataclasses.dataclass(eq=False)
class ImageRetrievalEvaluator(Evaluator):
    """Uni-modal image retrieval R@1 (percent) of a model's image features on class-labelled images
    (``cusa_hf.evaluation.loaders.load_labelled_images``): leave-one-out, or query -> ``gallery``.

    Args:
        eval_data: the query images and their labels.
        gallery: the gallery images (In-Shop), or ``None`` (leave-one-out).
        head: ``"uni"`` (the USA image head), ``"cross"`` or ``None`` (a plain backbone).
    """

    eval_data: LabelledImages = dataclasses.field(repr=False)
    gallery: LabelledImages | None = dataclasses.field(default=None, repr=False)
    metric_key_prefix: str = "eval"
    head: str | None = "uni"
    batch_size: int = 64
    show_progress: bool = True
    primary_metric: str = "image_r1"

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        value = evaluate_image_retrieval(model, processor.image_processor, self.eval_data, self.gallery, self.head,
                                         self.batch_size, accelerator, show_progress=self.show_progress)  # fmt: skip
        return self.prefixed({"image_r1": value}, metric_key_prefix)
