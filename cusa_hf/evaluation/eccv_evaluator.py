"""``EccvEvaluator``: ECCV Caption metrics (Chun et al. 2022) of a model on the COCO 5K test split, as an evaluator
object that ``CusaTrainer`` can call during training, alone or beside a ``RetrievalEvaluator``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import datasets
import torch

from .eccv import eccv_metrics
from .encoding import split_similarity
from .eval_view import RetrievalEvalView, build_eval_view
from .evaluator import Evaluator
from .metric_registry import MetricInfo, register_metric
from .metrics import RETRIEVAL_TASKS


def _register_eccv_metrics() -> None:
    for direction in ("i2t", "t2i"):
        task_type, task_name = RETRIEVAL_TASKS[direction]
        for metric, label in (("map_at_r", "mAP@R"), ("rprecision", "R-Precision"), ("r1", "R@1")):
            register_metric(MetricInfo(f"eccv_{metric}_{direction}", f"ECCV Caption {direction} {label}", task_type,
                                       task_name, table="ECCV Caption", column=f"{metric}_{direction}"))  # fmt: skip


_register_eccv_metrics()


@dataclasses.dataclass(eq=False)
class EccvEvaluator(Evaluator):
    """ECCV Caption mAP@R, R-Precision and R@1 (percent, both directions) of a model's similarities on a split.

    Args:
        eval_data: the COCO 5K test split, one row per caption (``datasets.Dataset``) or a ready
            :class:`~cusa_hf.evaluation.eval_view.RetrievalEvalView`; its image ids are COCO image ids.
        caption_ids: the COCO caption annotation id of each caption of the split, in row order.
        i2t_positives, t2i_positives: the extended positives (``cusa_hf.evaluation.eccv.load_eccv_positives``).
        batch_size, text_batch_size, head, image_root, show_progress: as ``RetrievalEvaluator``.
        primary_metric: the metric that ranks checkpoints (without prefix), ``"eccv_map_at_r_t2i"`` by default.

    Example::

        >>> eccv = EccvEvaluator(test, caption_ids, load_eccv_positives(i2t_file), load_eccv_positives(t2i_file))
        >>> trainer = CusaTrainer(..., evaluator=[RetrievalEvaluator(validation), eccv])
    """

    eval_data: datasets.Dataset | RetrievalEvalView = dataclasses.field(repr=False)
    caption_ids: Sequence[int] = dataclasses.field(repr=False)
    i2t_positives: Mapping[Any, Sequence[Any]] = dataclasses.field(repr=False)
    t2i_positives: Mapping[Any, Sequence[Any]] = dataclasses.field(repr=False)
    metric_key_prefix: str = "eval"
    batch_size: int = 64
    text_batch_size: int = 256
    head: str | None = "cross"
    image_root: str | None = None
    show_progress: bool = True
    primary_metric: str = "eccv_map_at_r_t2i"

    def __post_init__(self) -> None:
        self._view = self.eval_data if isinstance(self.eval_data, RetrievalEvalView) else None

    @property
    def eval_view(self) -> RetrievalEvalView:
        if self._view is None:
            self._view = build_eval_view(self.eval_data, image_root=self.image_root)
        return self._view

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        """``{f"{prefix}_eccv_map_at_r_i2t", ..., f"{prefix}_eccv_r1_t2i"}`` of ``model`` on the split."""
        view = self.eval_view
        similarity = split_similarity(
            model, processor, view, self.batch_size, self.text_batch_size, accelerator, self.head,
            show_progress=self.show_progress,
        )  # fmt: skip
        metrics = eccv_metrics(similarity, view.image_ids, self.caption_ids, self.i2t_positives, self.t2i_positives)
        return self.prefixed(metrics, metric_key_prefix)
