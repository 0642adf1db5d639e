"""COCO 5K / Flickr30K 1K retrieval metrics: R@1/5/10 in both directions and RSUM from a score matrix.

Protocol: image-to-text rank = best rank among all the image's captions, text-to-image rank = rank of the caption's one
image; R@K = percentage of queries with rank < K; RSUM = sum of the six recalls.

Ties. All rankings use the *pessimistic* rule by default: a positive is placed after every non-positive item whose
score is greater than **or equal to** its own. On tie-free scores this is exactly what a per-query
``argsort(descending)`` loop gives; with ties it never rewards a degenerate model (constant scores give R@K = 0 rather
than 100). ``ties="optimistic"`` (a positive placed before equal-scored items: rank = number of strictly greater
scores) is available for comparison.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .metric_registry import MetricInfo, register_metric

RECALL_KS = (1, 5, 10)
RETRIEVAL_METRIC_NAMES = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)
#: The model-index task of each direction: (task_type, task_name).
RETRIEVAL_TASKS = {
    "i2t": ("image-to-text-retrieval", "Image-to-Text Retrieval"),
    "t2i": ("text-to-image-retrieval", "Text-to-Image Retrieval"),
    "rsum": ("cross-modal-retrieval", "Image-Text Retrieval"),
}
#: Name infixes of the retrieval metrics' variants and their row labels: the main (possibly ITM-reranked) metrics, and
#: the ITC-only ones reported beside a reranking (``RetrievalEvaluator(rerank=...)``).
RETRIEVAL_VARIANTS = {"": "", "itc_": " (ITC, before ITM reranking)"}
TIE_RULES = ("pessimistic", "optimistic")
#: Elements per chunk of the score matrix; ~2 MB of float32 stays in a CPU core's cache (measured fastest on COCO 5K).
_CHUNK_ELEMENTS = 2**19
#: Float32 counts are exact only below 2**24; larger matrices are counted in float64.
_EXACT_FLOAT32_COUNT = 2**24


def _register_retrieval_metrics() -> None:
    for variant, row_label in RETRIEVAL_VARIANTS.items():
        for name in RETRIEVAL_METRIC_NAMES:
            direction = name.split("_")[0]
            task_type, task_name = RETRIEVAL_TASKS[direction]
            label = "RSUM" if name == "rsum" else f"{task_name.removesuffix(' Retrieval')} R@{name.split('_r')[1]}"
            register_metric(MetricInfo(f"{variant}{name}", label + row_label, task_type, task_name, "retrieval", name,
                                       row_label))  # fmt: skip


_register_retrieval_metrics()


# ----------------------------------------------------------------------------------------------------------- inputs
def _as_score_matrix(scores: Any, name: str) -> torch.Tensor:
    """A 2-D floating tensor view of a torch or numpy score matrix (integers become float64, exactly)."""
    tensor = torch.as_tensor(scores)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_images, n_texts) score matrix, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        if tensor.is_complex():
            raise ValueError(f"{name} has complex dtype {tensor.dtype}; scores must be real")
        tensor = tensor.to(torch.float64)
    return tensor


def _as_text_to_image(text_to_image: Any, n_images: int, n_texts: int) -> torch.Tensor:
    mapping = torch.as_tensor(text_to_image)
    if mapping.ndim != 1 or mapping.numel() != n_texts:
        raise ValueError(
            f"text_to_image must have one entry per text (column of the score matrix): expected shape ({n_texts},), "
            f"got {tuple(mapping.shape)}"
        )
    if mapping.is_floating_point() or mapping.is_complex() or mapping.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {mapping.dtype}")
    mapping = mapping.to(torch.long)
    out_of_range = (mapping < 0) | (mapping >= n_images)
    if out_of_range.any():
        text = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"text_to_image[{text}] = {int(mapping[text])} is not an image index in [0, {n_images}) "
            f"(the score matrix has {n_images} image rows)"
        )
    return mapping


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"ties={ties!r} is not supported; use one of {TIE_RULES}")


def _auto_chunk(chunk_size: int | None, row_length: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // row_length)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return int(chunk_size)


# ------------------------------------------------------------------------------------------------------- counting
class _AtLeastCounter:
    """Counts, per row or per column of a score block, the entries at or above (or strictly above) a threshold.

    The comparison writes 0/1 straight into a float buffer (``torch.ge(..., out=float_buffer)``) that is then summed:
    on CPU this runs several times faster than comparing into a bool tensor and reducing it, which casts the bools
    to int64 first. The counts are exact (sums of 0/1 below 2**24 in float32; larger matrices count in float64).
    """

    def __init__(self, strict: bool):
        self.compare = torch.gt if strict else torch.ge

    def rows(self, block: torch.Tensor, thresholds: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`(rows,)` counts of ``block[r] (>=|>) thresholds[r]``."""
        return self.compare(block, thresholds[:, None], out=buffer).sum(1)

    def columns(self, block: torch.Tensor, thresholds: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`(columns,)` counts of ``block[:, c] (>=|>) thresholds[c]``."""
        return self.compare(block, thresholds[None, :], out=buffer).sum(0)


def _raise_on_nan(matrix: torch.Tensor, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    view = matrix if rows is None else matrix[rows]
    view = view if cols is None else view[:, cols]
    nan = torch.isnan(view).nonzero()
    if len(nan):
        row, col = (int(v) for v in nan[0])
        row = row if rows is None else int(rows[row])
        col = col if cols is None else int(cols[col])
        raise ValueError(f"{name} contains NaN (first at image {row}, text {col}); scores must be numbers")


def _positive_scores(matrix: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """`(n_texts,)` score of each text with its own image."""
    return matrix[text_to_image, torch.arange(matrix.shape[1], device=matrix.device)]


def retrieval_ranks(
    similarity: Any,
    text_to_image: Any,
    t2i_similarity: Any = None,
    chunk_size: int | None = None,
    ties: str = "pessimistic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based retrieval ranks of every image query and every text query.

    Args:
        similarity: `(n_images, n_texts)` scores (torch on any device, or numpy); higher = more similar.
        text_to_image: `(n_texts,)` index of each text's image (a row of ``similarity``); an image may have any
            number of captions, but at least one.
        t2i_similarity: optional second `(n_images, n_texts)` matrix that text queries are ranked with (the
            reranked protocol gives one matrix per direction); default ``similarity``.
        chunk_size: rows processed at once; default keeps a chunk near 2**19 elements. Peak extra memory is about
            two chunks plus O(n_images + n_texts).
        ties: ``"pessimistic"`` (default) or ``"optimistic"``, see the module docstring.

    Returns:
        ``(i2t_ranks, t2i_ranks)``, long tensors of shapes `(n_images,)` and `(n_texts,)` on ``similarity``'s
        device. ``i2t_ranks[i]`` = number of non-captions of image i ranked before its best-ranked caption;
        ``t2i_ranks[t]`` = number of other images ranked before text t's image.
    """
    _check_ties(ties)
    i2t_matrix = _as_score_matrix(similarity, "similarity")
    n_images, n_texts = i2t_matrix.shape
    t2i_matrix = i2t_matrix if t2i_similarity is None else _as_score_matrix(t2i_similarity, "t2i_similarity")
    if t2i_matrix.shape != i2t_matrix.shape:
        raise ValueError(
            f"t2i_similarity has shape {tuple(t2i_matrix.shape)} but similarity has {tuple(i2t_matrix.shape)}; "
            "both are (n_images, n_texts)"
        )
    t2i_matrix = t2i_matrix.to(i2t_matrix.device)
    mapping = _as_text_to_image(text_to_image, n_images, n_texts).to(i2t_matrix.device)
    captions_per_image = torch.bincount(mapping, minlength=n_images)
    if (captions_per_image == 0).any():
        missing = (captions_per_image == 0).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} image rows have no caption in text_to_image (first: {missing}); "
            "their image-to-text rank is undefined. Drop them from the score matrix."
        )

    # Half precision is compared in float32; counts above 2**24 need float64 to stay exact.
    work_dtype = torch.promote_types(i2t_matrix.dtype, torch.float32)
    if max(n_images, n_texts) >= _EXACT_FLOAT32_COUNT:
        work_dtype = torch.float64
    strict = ties == "optimistic"
    counter = _AtLeastCounter(strict)

    # Image queries: threshold = best score among the image's captions.
    i2t_positive = _positive_scores(i2t_matrix, mapping).to(work_dtype)
    best = torch.full((n_images,), -math.inf, dtype=work_dtype, device=i2t_matrix.device)
    best.scatter_reduce_(0, mapping, i2t_positive, reduce="amax")
    # Text queries: threshold = score with its own image.
    t2i_positive = _positive_scores(t2i_matrix, mapping).to(work_dtype)

    rows = _auto_chunk(chunk_size, n_texts)
    buffer = torch.empty((min(rows, n_images), n_texts), dtype=work_dtype, device=i2t_matrix.device)
    i2t_counts = torch.empty(n_images, dtype=work_dtype, device=i2t_matrix.device)
    t2i_counts = torch.zeros(n_texts, dtype=torch.float64, device=i2t_matrix.device)
    # NaN compares false everywhere, so it would pass silently: a chunk whose sum is NaN is checked for NaN scores
    # (a NaN sum can also come from inf + -inf, which is fine).
    chunk_sums = torch.zeros((2, -(-n_images // rows)), dtype=work_dtype, device=i2t_matrix.device)
    for chunk, start in enumerate(range(0, n_images, rows)):
        stop = min(start + rows, n_images)
        i2t_block = i2t_matrix[start:stop].to(work_dtype)
        t2i_block = i2t_block if t2i_similarity is None else t2i_matrix[start:stop].to(work_dtype)
        chunk_sums[0, chunk] = i2t_block.sum()
        if t2i_similarity is not None:
            chunk_sums[1, chunk] = t2i_block.sum()
        block_buffer = buffer[: stop - start]
        i2t_counts[start:stop] = counter.rows(i2t_block, best[start:stop], block_buffer)
        t2i_counts += counter.columns(t2i_block, t2i_positive, block_buffer)
    for matrix, name, sums in ((i2t_matrix, "similarity", chunk_sums[0]), (t2i_matrix, "t2i_similarity", chunk_sums[1])):
        for chunk in torch.isnan(sums).nonzero().flatten().tolist():
            _raise_on_nan(matrix, name, rows=torch.arange(chunk * rows, min((chunk + 1) * rows, n_images)))

    if strict:  # entries strictly above the best caption / the own image are all non-positives
        i2t_ranks = i2t_counts.round().long()
        t2i_ranks = t2i_counts.round().long()
    else:  # at-or-above counts include the best caption(s) tied at the top / the own image
        tied_positives = torch.zeros(n_images, dtype=torch.long, device=i2t_matrix.device)
        tied_positives.scatter_add_(0, mapping, (i2t_positive == best[mapping]).long())
        i2t_ranks = i2t_counts.round().long() - tied_positives
        t2i_ranks = t2i_counts.round().long() - 1
    return i2t_ranks, t2i_ranks


def recalls_from_ranks(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict:
    """``{"i2t_r{k}", "t2i_r{k}", "rsum"}`` in percent from 0-based ranks."""
    metrics = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            metrics[f"{direction}_r{k}"] = 100.0 * float((ranks < k).double().mean())
    metrics["rsum"] = sum(metrics.values())
    return metrics


def retrieval_metrics(
    similarity: Any,
    text_to_image: Any,
    t2i_similarity: Any = None,
    chunk_size: int | None = None,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """R@1/5/10 in both directions and RSUM (percent) for an `(n_images, n_texts)` score matrix.

    The COCO/Flickr protocol: an image query is answered when *any* of its captions is within the top K; a text
    query when its image is. Arguments as in :func:`retrieval_ranks`.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}`` (floats, percent).

    Example::

        >>> sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])  # 2 images x 3 captions
        >>> retrieval_metrics(sim, text_to_image=[0, 0, 1])["rsum"]
        600.0
    """
    return recalls_from_ranks(*retrieval_ranks(similarity, text_to_image, t2i_similarity, chunk_size, ties))


def format_retrieval_table(results: dict[str, dict[str, float]], prefix: str) -> str:
    """A fixed-width table of R@1/5/10 and RSUM, one line per run.

    Args:
        results: ``{run name: metrics}`` with keys ``f"{prefix}_i2t_r1"`` ... ``f"{prefix}_rsum"`` (missing ones show
            as ``nan``).
        prefix: the split's metric prefix (``"test"``, ``"validation"``).
    """
    lines = [f"{'run':<10}" + "".join(f"{name:>9}" for name in RETRIEVAL_METRIC_NAMES)]
    for run, metrics in results.items():
        values = (metrics.get(f"{prefix}_{name}", float("nan")) for name in RETRIEVAL_METRIC_NAMES)
        lines.append(f"{run:<10}" + "".join(f"{value:>9.2f}" for value in values))
    return "\n".join(lines)
