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
class UnimodalEvaluator(Evaluator):
    """One number of a model's uni-modal features, named ``primary_metric``: a subclass gives its data as fields and
    measures it in ``measure``.

    Args (keyword-only):
        head: ``"uni"`` (the USA heads), ``"cross"`` or ``None`` (a plain backbone).
        metric_key_prefix: the prefix of the returned name.
        show_progress: show progress bars while encoding.
    """

    head: str | None = dataclasses.field(default="uni", kw_only=True)
    metric_key_prefix: str = dataclasses.field(default="eval", kw_only=True)
    show_progress: bool = dataclasses.field(default=True, kw_only=True)

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        return self.prefixed({self.primary_metric: self.measure(model, processor, accelerator)}, metric_key_prefix)

    def measure(self, model: torch.nn.Module, processor: Any, accelerator: Any) -> float:
        """The metric's value for ``model`` (wrapped by ``accelerator`` or not) with its ``processor``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement measure")


@dataclasses.dataclass(eq=False)
class StsEvaluator(UnimodalEvaluator):
    """STS Spearman (x100) of a model's text features (the USA text head by default) on sentence pairs
    (``cusa_hf.evaluation.loaders.load_sts``).

    Args:
        eval_data: the sentence pairs and gold scores.
    """

    eval_data: StsData = dataclasses.field(repr=False)
    batch_size: int = 256
    primary_metric: str = "sts_spearman"

    def measure(self, model: torch.nn.Module, processor: Any, accelerator: Any) -> float:
        return evaluate_sts(model, processor.tokenizer, self.eval_data, self.head, self.batch_size, accelerator,
                            show_progress=self.show_progress)  # fmt: skip


@dataclasses.dataclass(eq=False)
class ImageRetrievalEvaluator(UnimodalEvaluator):
    """Uni-modal image retrieval R@1 (percent) of a model's image features (the USA image head by default) on
    class-labelled images (``cusa_hf.evaluation.loaders.load_labelled_images``): leave-one-out, or query ->
    ``gallery``.

    Args:
        eval_data: the query images and their labels.
        gallery: the gallery images (In-Shop), or ``None`` (leave-one-out).
    """

    eval_data: LabelledImages = dataclasses.field(repr=False)
    gallery: LabelledImages | None = dataclasses.field(default=None, repr=False)
    batch_size: int = 64
    primary_metric: str = "image_r1"

    def measure(self, model: torch.nn.Module, processor: Any, accelerator: Any) -> float:
        return evaluate_image_retrieval(model, processor.image_processor, self.eval_data, self.gallery, self.head,
                                        self.batch_size, accelerator, show_progress=self.show_progress)  # fmt: skip
