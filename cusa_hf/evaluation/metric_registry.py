"""The registry of evaluation metrics: what each metric key means, for readers of logged metrics (the model card).

A metric is registered once, where it is defined, by the name it is logged under without its split prefix
(``i2t_r1``, ``itc_rsum``, ``eccv_map_at_r_i2t``, ``sts_spearman``): its label, the Hub model-index task it belongs
to, and the results table (and column, and row variant) the model card shows it in. Readers look a name up
(:func:`metric_info`) instead of parsing it, so a new metric and its evaluator live in one file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    """What a metric key means.

    Attributes:
        name: the key without its split prefix (``"t2i_r5"``).
        label: its name for people (``"Text-to-Image R@5"``), the model-index ``metric_name``.
        task_type, task_name: the model-index task (``"text-to-image-retrieval"``, ``"Text-to-Image Retrieval"``).
        table: the model card's results table that shows it (``"retrieval"``).
        column: its column in that table (``"t2i_r5"``).
        variant: the row label suffix of its variant (``" (ITC, before ITM reranking)"``; ``""`` for the main row).
    """

    name: str
    label: str
    task_type: str
    task_name: str
    table: str
    column: str
    variant: str = ""


_METRICS: dict[str, MetricInfo] = {}


def register_metric(info: MetricInfo) -> MetricInfo:
    """Register ``info`` under ``info.name`` (registering the same name again replaces it)."""
    _METRICS[info.name] = info
    return info


def metric_info(name: str) -> MetricInfo | None:
    """The registered metric ``name`` (a key without its split prefix), or ``None``."""
    return _METRICS.get(name)


def registered_metrics() -> tuple[MetricInfo, ...]:
    """Every registered metric, in registration order."""
    return tuple(_METRICS.values())
