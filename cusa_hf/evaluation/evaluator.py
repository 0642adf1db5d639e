"""Evaluators: objects that compute a model's metrics, as sentence-transformers' ``SentenceEvaluator``.

* :class:`Evaluator`: the contract ``CusaTrainer`` relies on: ``evaluator(model, processor, accelerator=...,
  metric_key_prefix=...)`` returns a dict of metrics named ``{prefix}_{metric}``, and ``primary_metric`` (without
  prefix) with ``greater_is_better`` says which metric ranks checkpoints;
* :class:`SequentialEvaluator`: several evaluators as one (``CusaTrainer(evaluator=[...])``);
* :class:`RetrievalEvaluator`: image-text retrieval metrics of one evaluation split. ECCV Caption and uni-modal
  evaluators are in ``eccv_evaluator`` and ``unimodal_evaluators``.

A ``RetrievalEvaluator`` is built once with the split, called with a model at every evaluation (by ``CusaTrainer.evaluate`` or directly), in the
spirit of sentence-transformers' evaluators. It builds the split's :class:`~cusa_hf.evaluation.eval_view.RetrievalEvalView` on first
use and keeps it, checks cached frozen-tower columns against each model it is called with, and picks the scoring:
a pairwise scorer (backbones that score pairs themselves, e.g. SGRAF), dual-encoder similarity, or dual-encoder
top-k reranked by a fusion encoder's ITM head (X2VLM, BLIP).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, ClassVar, Sequence

import datasets
import torch

from ..backbones import RerankConfig
from .eval_view import RetrievalEvalView, build_eval_view
from ..frozen_towers import check_tower_columns
from ..teachers.training_split import open_feature_split
from ..schema import CAPTION_COLUMN, IMAGE_COLUMN, IMAGE_ID_COLUMN, IMAGE_TOWER_COLUMN, TEXT_TOWER_COLUMN
from .encoding import evaluate_retrieval
from .metrics import RETRIEVAL_METRIC_NAMES, RETRIEVAL_VARIANTS, retrieval_metrics
from .reranking import BlockScoreFn, pairwise_similarity

#: ``rerank(model, processor, eval_view) -> RerankConfig``, called at every evaluation (the ITM scorer encodes the
#: split with the current weights); e.g. ``cusa_hf.models.x2vlm.adapter.x2vlm_rerank_config``.
RerankFactory = Callable[[torch.nn.Module, Any, RetrievalEvalView], RerankConfig]
#: ``pairwise_scorer(model, eval_view) -> score_fn`` for :func:`pairwise_similarity`, called at every evaluation;
#: e.g. ``cusa_hf.models.sgraf.evaluation.sgraf_pairwise_scorer(features, tokenizer)``.
PairwiseScorerFactory = Callable[[torch.nn.Module, RetrievalEvalView], BlockScoreFn]


class Evaluator:
    """The evaluator contract: a callable object that computes metrics of a model.

    Attributes:
        primary_metric: the metric (without prefix) that ranks checkpoints; ``CusaTrainer`` keeps the checkpoint best
            on it unless ``metric_for_best_model`` says otherwise.
        greater_is_better: whether a higher ``primary_metric`` is better.
        metric_key_prefix: the default prefix of the returned names (``"eval"`` gives ``eval_rsum``).
        eval_data: the data it evaluates (``CusaTrainer``'s ``eval_dataset`` when none is given), or ``None``.

    A subclass implements ``__call__`` (and, if it evaluates a split whose settings apply to others, ``for_data``).
    Metrics it adds are registered in ``cusa_hf.evaluation.metric_registry`` (the model card reads their labels there).
    """

    primary_metric: str
    greater_is_better: bool = True
    metric_key_prefix: str = "eval"
    eval_data: Any = None

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        """``{f"{prefix}_{metric}": value}`` of ``model`` (wrapped by ``accelerator`` or not); ``metric_key_prefix``
        overrides the evaluator's prefix (``CusaTrainer.evaluate`` passes its own)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def for_data(self, eval_data: Any) -> Evaluator | None:
        """An evaluator with these settings for other data (``CusaTrainer.evaluate(dataset)``), or ``None`` when the
        settings do not carry over (the trainer then builds a ``RetrievalEvaluator`` for the data)."""
        return None

    def prefixed(self, metrics: dict[str, float], metric_key_prefix: str | None = None) -> dict[str, float]:
        """``metrics`` named ``{prefix}_{name}``, the prefix given or the evaluator's."""
        prefix = self.metric_key_prefix if metric_key_prefix is None else metric_key_prefix
        return {f"{prefix}_{name}": value for name, value in metrics.items()}


class SequentialEvaluator(Evaluator):
    """Several evaluators called one after the other, their metrics merged; the first one's ``primary_metric``,
    ``greater_is_better``, prefix and (with ``for_data``) settings for other splits stand for all.

    Example::

        >>> evaluator = SequentialEvaluator([RetrievalEvaluator(validation), StsEvaluator(load_sts("stsb.csv"))])
        >>> evaluator(model, processor)  # {"eval_i2t_r1": ..., "eval_rsum": ..., "eval_sts_spearman": ...}
    """

    def __init__(self, evaluators: Sequence[Evaluator]):
        evaluators = list(evaluators)
        if not evaluators:
            raise ValueError("SequentialEvaluator needs at least one evaluator")
        for evaluator in evaluators:
            if not isinstance(evaluator, Evaluator):
                raise TypeError(f"expected Evaluator objects, got {type(evaluator).__name__}")
        self.evaluators = evaluators
        first = evaluators[0]
        self.primary_metric, self.greater_is_better = first.primary_metric, first.greater_is_better
        self.metric_key_prefix = first.metric_key_prefix
        self.eval_data = next((evaluator.eval_data for evaluator in evaluators if evaluator.eval_data is not None), None)

    def __call__(
        self, model: torch.nn.Module, processor: Any = None, *, accelerator: Any = None, metric_key_prefix: str | None = None
    ) -> dict[str, float]:
        prefix = self.metric_key_prefix if metric_key_prefix is None else metric_key_prefix
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            computed = evaluator(model, processor, accelerator=accelerator, metric_key_prefix=prefix)
            repeated = sorted(set(computed) & set(metrics))
            if repeated:
                raise ValueError(f"two evaluators of a SequentialEvaluator return {repeated}; give them other metrics")
            metrics.update(computed)
        return metrics

    def for_data(self, eval_data: Any) -> Evaluator | None:
        return self.evaluators[0].for_data(eval_data)


def _row_setting(default: Any) -> Any:
    """An evaluator field that says how rows are read, as the data collator attribute of the same name does
    (``CusaDataCollator`` and the backbones' collators): :meth:`RetrievalEvaluator.from_collator` copies it."""
    return dataclasses.field(default=default, metadata={"row_setting": True})


@dataclasses.dataclass(eq=False)
class RetrievalEvaluator(Evaluator):
    """COCO/Flickr R@1/5/10 and RSUM of a model on one evaluation split.

    Args:
        eval_data: a ``datasets.Dataset`` (one row per caption, or one row per image with a caption list) or a
            ready :class:`~cusa_hf.evaluation.eval_view.RetrievalEvalView`.
        metric_key_prefix: prefix of the returned metric names (``"eval"`` gives ``eval_i2t_r1`` ... ``eval_rsum``).
        batch_size: images per encoding batch; text_batch_size: captions per batch.
        rerank: fusion-encoder ITM reranking: a :class:`RerankConfig` (its ``itm_score`` takes indices into the
            eval view), or a factory ``rerank(model, processor, eval_view) -> RerankConfig`` called at every
            evaluation (``x2vlm_rerank_config``, ``blip_rerank_config``). The reranked numbers are reported under
            the usual names and the dual-encoder ones with an ``itc_`` infix.
        pairwise_scorer: for backbones that score pairs themselves (``adapter.scores_pairs_itself``, SGRAF): a
            factory ``pairwise_scorer(model, eval_view) -> score_fn`` whose ``score_fn(image_idx, text_idx)`` returns
            blocks of the score matrix; replaces encoding.
        head: the ``CusaModel`` head that embeds (``"cross"``), or ``None`` for a plain backbone.
        image_column, caption_column, image_id_column, image_root, image_tower_column, text_tower_column: how to read
            ``eval_data``, as ``CusaDataCollator`` (see :meth:`from_collator`).
        max_length: the caption token limit of training (the collator's), which a cached text-tower column must
            have been computed with; ``None``: the tokenizer's own limit.
        show_progress: progress bars (on the main process only under ``accelerate``).
        primary_metric: the metric that ranks models (without prefix: ``"rsum"``, ``"t2i_r1"``, ``"itc_rsum"``, ...);
            ``CusaTrainer`` keeps the checkpoint that is best on it unless ``metric_for_best_model`` says otherwise,
            as sentence-transformers' evaluators' ``primary_metric``. Every retrieval metric is better when higher
            (``greater_is_better``).

    Example::

        >>> evaluator = RetrievalEvaluator(splits["validation"], batch_size=64)
        >>> evaluator(model, processor)  # {"eval_i2t_r1": ..., ..., "eval_rsum": ...}
        >>> trainer = CusaTrainer(model=model, args=args, train_dataset=splits["train"], processing_class=processor,
        ...                       evaluator=evaluator)  # evaluates with it at every eval step
    """

    eval_data: datasets.Dataset | RetrievalEvalView = dataclasses.field(repr=False)
    metric_key_prefix: str = "eval"
    batch_size: int = 64
    text_batch_size: int = 256
    rerank: RerankConfig | RerankFactory | None = None
    pairwise_scorer: PairwiseScorerFactory | None = None
    head: str | None = "cross"
    image_column: str = _row_setting(IMAGE_COLUMN)
    caption_column: str = _row_setting(CAPTION_COLUMN)
    image_id_column: str = _row_setting(IMAGE_ID_COLUMN)
    image_root: str | None = _row_setting(None)
    image_tower_column: str | None = _row_setting(IMAGE_TOWER_COLUMN)
    text_tower_column: str | None = _row_setting(TEXT_TOWER_COLUMN)
    max_length: int | None = _row_setting(None)
    show_progress: bool = True
    primary_metric: str = "rsum"
    greater_is_better: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.eval_data, (datasets.Dataset, RetrievalEvalView)):
            raise TypeError(
                f"eval_data must be a datasets.Dataset or a RetrievalEvalView, got {type(self.eval_data).__name__}"
                + ("; build one RetrievalEvaluator per split" if isinstance(self.eval_data, dict) else "")
            )
        for name in ("batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        metric_names = tuple(f"{variant}{name}" for variant in RETRIEVAL_VARIANTS for name in RETRIEVAL_METRIC_NAMES)
        if self.primary_metric not in metric_names:
            raise ValueError(f"primary_metric={self.primary_metric!r} is not a retrieval metric; one of {list(metric_names)}")
        if self.rerank is not None and self.pairwise_scorer is not None:
            raise ValueError("pass rerank or pairwise_scorer, not both: a pairwise scorer already scores every pair")
        if self.rerank is not None and not (isinstance(self.rerank, RerankConfig) or callable(self.rerank)):
            raise TypeError(f"rerank must be a RerankConfig or a factory, got {type(self.rerank).__name__}")
        if self.pairwise_scorer is not None and not callable(self.pairwise_scorer):
            raise TypeError(f"pairwise_scorer must be a factory, got {type(self.pairwise_scorer).__name__}")
        self._view = self.eval_data if isinstance(self.eval_data, RetrievalEvalView) else None
        self._checked_models: weakref.WeakSet = weakref.WeakSet()

    @classmethod
    def from_collator(cls, eval_data: datasets.Dataset | RetrievalEvalView, collator: Any, **settings: Any):
        """An evaluator reading ``eval_data`` as ``collator`` reads training rows: its column names, ``image_root``
        and ``max_length`` (attributes it lacks keep their defaults). ``settings``: the other constructor arguments."""
        row_settings = [spec.name for spec in dataclasses.fields(cls) if spec.metadata.get("row_setting")]
        columns = {name: getattr(collator, name) for name in row_settings if hasattr(collator, name)}
        return cls(eval_data, **columns, **settings)

    def for_data(self, eval_data: datasets.Dataset | RetrievalEvalView) -> RetrievalEvaluator:
        """An evaluator with the same settings for another split (with its own view)."""
        return dataclasses.replace(self, eval_data=eval_data)

    @property
    def eval_view(self) -> RetrievalEvalView:
        """The split's unique images, captions and caption -> image map, built on first use (decodes no image)."""
        if self._view is None:
            self._view = build_eval_view(
                self.eval_data,
                image_column=self.image_column,
                caption_column=self.caption_column,
                image_id_column=self.image_id_column,
                image_root=self.image_root,
                image_tower_column=self.image_tower_column,
                text_tower_column=self.text_tower_column,
            )
        return self._view

    def __call__(
        self,
        model: torch.nn.Module,
        processor: Any = None,
        *,
        accelerator: Any = None,
        metric_key_prefix: str | None = None,
    ) -> dict[str, float]:
        """Retrieval metrics of ``model`` on the split.

        Args:
            model: a ``CusaModel`` (or, with ``head=None``, any model with ``get_image_features`` /
                ``get_text_features``); wrapped by ``accelerator`` or not.
            processor: the processor with ``image_processor`` and ``tokenizer`` (needed unless a pairwise scorer
                scores the pairs).
            accelerator: an ``accelerate.Accelerator``: each process encodes a shard and all get the metrics.
            metric_key_prefix: overrides the evaluator's prefix (``CusaTrainer.evaluate`` passes its own).

        Returns:
            ``{f"{prefix}_i2t_r1", ..., f"{prefix}_t2i_r10", f"{prefix}_rsum"}`` in percent (plus ``{prefix}_itc_*``
            with ``rerank``).
        """
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        self._check_tower_columns(unwrapped, processor)
        view = self.eval_view
        if self.pairwise_scorer is not None:
            score_fn = self.pairwise_scorer(unwrapped, view)
            similarity = pairwise_similarity(
                score_fn, view.num_images, view.num_texts, show_progress=self.show_progress
            )
            retrieval = retrieval_metrics(similarity, view.text_to_image)
        elif getattr(getattr(unwrapped, "adapter", None), "scores_pairs_itself", False):
            raise ValueError(
                f"a {unwrapped.config.backbone_config.model_type!r} backbone scores image-text pairs itself: pass "
                "RetrievalEvaluator(..., pairwise_scorer=...) (e.g. "
                "cusa_hf.models.sgraf.evaluation.sgraf_pairwise_scorer(features, tokenizer))"
            )
        else:
            if processor is None:
                raise ValueError("RetrievalEvaluator needs the model's processor (image_processor and tokenizer)")
            rerank = self.rerank
            if rerank is not None and not isinstance(rerank, RerankConfig):
                rerank = rerank(unwrapped, processor, view)
            retrieval = evaluate_retrieval(
                model,
                processor,
                view,
                batch_size=self.batch_size,
                text_batch_size=self.text_batch_size,
                accelerator=accelerator,
                head=self.head,
                rerank=rerank,
                show_progress=self.show_progress,
            )
        return self.prefixed(retrieval, metric_key_prefix)

    def _check_tower_columns(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse cached frozen-tower columns that another tower or preprocessing made; once per model (the check
        hashes the tower's weights, which a frozen tower keeps through training)."""
        if not isinstance(self.eval_data, datasets.Dataset) or model in self._checked_models:
            return
        # The evaluator carries the column attributes of a collator, which is what the check reads.
        check_tower_columns(model, open_feature_split(self.eval_data), self, processor)
        self._checked_models.add(model)
