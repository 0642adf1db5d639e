"""Evaluation of image-text retrieval models: encoding, R@K / RSUM, ITM reranking, ECCV Caption, uni-modal metrics.

Protocols (each matches the definition the CUSA paper reports; see ``docs/evaluation.md``):

* **COCO 5K / Flickr30K 1K R@K** (:func:`retrieval_metrics`): image-to-text rank = best rank among all the image's
  captions, text-to-image rank = rank of the caption's one image; R@K = percentage of queries with rank < K;
  RSUM = sum of the six recalls.
* **Fusion reranking** (:func:`rerank_with_itm`): the X2VLM/BLIP protocol, dual-encoder top-k then ITM rescoring.
* **ECCV Caption** (:func:`eccv_metrics`): mAP@R, R-Precision and R@1 with the extended positives of Chun et al. 2022.
* **Uni-modal image retrieval R@1** (:func:`image_retrieval_r1`): leave-one-out nearest neighbour by cosine similarity
  on a class-labelled image set (CUB, SOP, iNaturalist) or query -> gallery (In-Shop).
* **STS** (:func:`sts_spearman`): Spearman correlation between cosine similarity and gold scores.

Ties. All rankings use the *pessimistic* rule by default: a positive is placed after every non-positive item whose
score is greater than **or equal to** its own. On tie-free scores this is exactly what a per-query
``argsort(descending)`` loop gives; with ties it never rewards a degenerate model (constant scores give R@K = 0 rather
than 100). ``ties="optimistic"`` (a positive placed before equal-scored items: rank = number of strictly greater
scores) is available for comparison.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import RetrievalEvalView, load_image

RECALL_KS = (1, 5, 10)
RETRIEVAL_METRIC_NAMES = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)
TIE_RULES = ("pessimistic", "optimistic")
#: Elements per chunk of the score matrix; ~2 MB of float32 stays in a CPU core's cache (measured fastest on COCO 5K).
_CHUNK_ELEMENTS = 2**19
#: Float32 counts are exact only below 2**24; larger matrices are counted in float64.
_EXACT_FLOAT32_COUNT = 2**24

ItmScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BlockScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


# -------------------------------------------------------------------------------------- pairwise scoring & reranking
def pairwise_similarity(
    score_fn: BlockScoreFn,
    n_images: int,
    n_texts: int,
    image_chunk: int = 128,
    text_chunk: int = 1024,
    show_progress: bool = True,
) -> torch.Tensor:
    """The full `(n_images, n_texts)` matrix of a backbone that scores image-text pairs itself (e.g. SGRAF).

    Args:
        score_fn: ``score_fn(image_idx, text_idx)`` with two long index tensors returns the
            `(len(image_idx), len(text_idx))` block of scores.
        image_chunk, text_chunk: block sizes.

    Returns:
        `(n_images, n_texts)` tensor with the dtype and device of the first block ``score_fn`` returns.
    """
    if n_images < 1 or n_texts < 1:
        raise ValueError(f"need at least one image and one text, got n_images={n_images}, n_texts={n_texts}")
    if image_chunk < 1 or text_chunk < 1:
        raise ValueError(f"image_chunk and text_chunk must be positive, got {image_chunk}, {text_chunk}")
    similarity: torch.Tensor | None = None
    blocks = [(i, t) for i in range(0, n_images, image_chunk) for t in range(0, n_texts, text_chunk)]
    for image_start, text_start in tqdm(blocks, desc="pairwise scores", disable=not show_progress):
        image_idx = torch.arange(image_start, min(image_start + image_chunk, n_images))
        text_idx = torch.arange(text_start, min(text_start + text_chunk, n_texts))
        block = torch.as_tensor(score_fn(image_idx, text_idx))
        if block.shape != (len(image_idx), len(text_idx)):
            raise ValueError(
                f"score_fn returned a block of shape {tuple(block.shape)} for {len(image_idx)} images x "
                f"{len(text_idx)} texts (image {image_start}, text {text_start}); expected "
                f"({len(image_idx)}, {len(text_idx)})"
            )
        if similarity is None:
            similarity = torch.empty((n_images, n_texts), dtype=block.dtype, device=block.device)
        similarity[image_idx[0] : image_idx[-1] + 1, text_idx[0] : text_idx[-1] + 1] = block
    return similarity


def _score_candidates(
    itm_score: ItmScoreFn,
    query_idx: torch.Tensor,
    candidate_idx: torch.Tensor,
    query_is_image: bool,
    batch_size: int,
    progress: tqdm,
) -> torch.Tensor:
    """ITM scores of every (query, candidate) pair, `(n_queries, k)` float32."""
    queries = query_idx[:, None].expand_as(candidate_idx).reshape(-1)
    candidates = candidate_idx.reshape(-1)
    scores = torch.empty(queries.numel(), dtype=torch.float32, device=candidate_idx.device)
    for start in range(0, queries.numel(), batch_size):
        stop = min(start + batch_size, queries.numel())
        image_idx, text_idx = (queries, candidates) if query_is_image else (candidates, queries)
        batch_scores = torch.as_tensor(itm_score(image_idx[start:stop], text_idx[start:stop]))
        if batch_scores.shape != (stop - start,):
            raise ValueError(
                f"itm_score returned shape {tuple(batch_scores.shape)} for {stop - start} aligned pairs; "
                f"expected ({stop - start},)"
            )
        if not torch.isfinite(batch_scores).all():
            raise ValueError("itm_score returned a non-finite score (NaN or inf); reranking needs finite scores")
        scores[start:stop] = batch_scores.to(device=scores.device, dtype=torch.float32)
        progress.update(stop - start)
    return scores.view_as(candidate_idx)


def rerank_with_itm(
    similarity: Any,
    itm_score: ItmScoreFn,
    k_i2t: int = 256,
    k_t2i: int = 128,
    batch_size: int = 128,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fusion-encoder reranking (X2VLM/BLIP protocol): rescore each query's dual-encoder top-k with ITM.

    For every image the ``k_i2t`` texts with the highest ``similarity`` are scored by ``itm_score``; for every text
    the ``k_t2i`` images likewise. Every other entry gets one fill value: the largest float below the lowest
    candidate score of that matrix (``torch.nextafter(min, -inf)``), so non-candidates rank after all candidates
    whatever the ITM score range (X2VLM's original uses a constant -100, which assumes ITM logits above -100).
    Candidates are taken with ``torch.topk``; ties at the k-th place are broken by ``topk``'s choice.

    Args:
        similarity: `(n_images, n_texts)` dual-encoder scores.
        itm_score: ``itm_score(image_idx, text_idx)`` with two aligned `(n_pairs,)` long tensors (on
            ``similarity``'s device) returns `(n_pairs,)` match scores (e.g. the ITM positive logit; add the
            dual-encoder score inside the callable for BLIP's ``itm + itc`` variant).
        k_i2t, k_t2i: candidates per image / per text query (X2VLM: 256 on COCO, 128 on Flickr30K); clipped to the
            number of texts / images.
        batch_size: pairs per ``itm_score`` call.

    Returns:
        ``(i2t_scores, t2i_scores)``, each `(n_images, n_texts)` float32; pass them to
        ``retrieval_metrics(i2t_scores, text_to_image, t2i_similarity=t2i_scores)``.
    """
    matrix = _as_score_matrix(similarity, "similarity")
    if k_i2t < 1 or k_t2i < 1 or batch_size < 1:
        raise ValueError(f"k_i2t, k_t2i and batch_size must be positive, got {k_i2t}, {k_t2i}, {batch_size}")
    n_images, n_texts = matrix.shape
    k_i2t, k_t2i = min(k_i2t, n_texts), min(k_t2i, n_images)
    i2t_candidates = matrix.topk(k_i2t, dim=1).indices  # (n_images, k_i2t) text indices
    t2i_candidates = matrix.topk(k_t2i, dim=0).indices.T  # (n_texts, k_t2i) image indices
    device = matrix.device
    with tqdm(total=n_images * k_i2t + n_texts * k_t2i, desc="ITM rerank", disable=not show_progress) as progress:
        i2t_values = _score_candidates(
            itm_score, torch.arange(n_images, device=device), i2t_candidates, True, batch_size, progress
        )
        t2i_values = _score_candidates(
            itm_score, torch.arange(n_texts, device=device), t2i_candidates, False, batch_size, progress
        )

    def fill_below(values: torch.Tensor) -> torch.Tensor:
        lowest = values.min()
        return torch.full((n_images, n_texts), float(torch.nextafter(lowest, lowest.new_tensor(-math.inf))),
                          dtype=torch.float32, device=device)

    i2t_scores = fill_below(i2t_values)
    i2t_scores.scatter_(1, i2t_candidates, i2t_values)
    t2i_scores = fill_below(t2i_values)
    t2i_scores.T.scatter_(1, t2i_candidates, t2i_values)
    return i2t_scores, t2i_scores


@dataclass
class RerankConfig:
    """How :func:`evaluate_retrieval` reranks: an ITM scorer over the eval view's image/text indices and the k's."""

    itm_score: ItmScoreFn
    k_i2t: int = 256
    k_t2i: int = 128
    batch_size: int = 128


# ----------------------------------------------------------------------------------------------------- ECCV Caption
def load_eccv_positives(path: str | os.PathLike) -> dict[int, list[int]]:
    """Read one ECCV Caption positives file (``eccv_image_to_caption.json`` or ``eccv_caption_to_image.json``).

    The format of Chun et al. 2022 (github.com/naver-ai/eccv-caption, ``eccv_caption/data``): a JSON object mapping a
    query id (as a string) to the list of its positive ids; image ids are COCO image ids and caption ids are COCO
    caption *annotation* ids (``captions_val2014.json`` ``annotations[].id``, not Karpathy's sentence ids).
    """
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{query_id: [positive ids]}}, got {type(raw).__name__}")
    positives = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: query {key!r} must map to a non-empty list of ids, got {values!r}")
        try:
            positives[int(key)] = [int(value) for value in values]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: query {key!r} has a non-integer id in {values!r}") from None
    return positives


def _index_positives(
    positives: Mapping[Any, Sequence[Any]], query_ids: Sequence[Any], item_ids: Sequence[Any], direction: str
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Query rows, the item columns of each query's positives, and each query's number of positives R. Positives that
    are not among the evaluated items count in R but can never be retrieved, as in the official ECCV Caption code
    (two of its caption-to-image positives are outside its own 25,000 test captions); a warning names them."""
    query_index = {int(q): i for i, q in enumerate(query_ids)}
    item_index = {int(v): i for i, v in enumerate(item_ids)}
    queries, items, counts, missing = [], [], [], []
    for query, positive_ids in positives.items():
        if int(query) not in query_index:
            raise ValueError(f"ECCV {direction} query id {query} is not among the evaluated ids")
        unique = {int(p) for p in positive_ids}
        missing += [(query, p) for p in sorted(unique) if p not in item_index]
        queries.append(query_index[int(query)])
        items.append(torch.tensor(sorted(item_index[p] for p in unique if p in item_index), dtype=torch.long))
        counts.append(len(unique))
    if missing:
        warnings.warn(
            f"ECCV {direction}: {len(missing)} positive id(s) are not among the evaluated items (first: query "
            f"{missing[0][0]}, positive {missing[0][1]}); they count as never retrieved, as in the official code",
            stacklevel=3,
        )
    return torch.tensor(queries, dtype=torch.long), items, torch.tensor(counts, dtype=torch.long)


def _map_at_r(
    scores: torch.Tensor, query_rows: torch.Tensor, positives: list[torch.Tensor], counts: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    """mAP@R, R-Precision and R@1 (fractions) of the queries ``query_rows`` of ``scores`` (queries x items).

    ``counts`` is each query's R, which may exceed its retrievable ``positives``. With pessimistic ties, the j-th best
    retrievable positive (0-based) of a query sits at 0-based position ``j + #(non-positives scoring >= it)``; from
    those positions, over the first R places: R-Precision = hits / R, AP@R = (1/R) * sum over hits of precision at
    that place, R@1 = hit at place 0.
    """
    max_r = max(1, max(len(p) for p in positives))
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(query_rows), chunk_size):
        rows = query_rows[start : start + chunk_size].to(scores.device)
        block = scores[rows].to(torch.float64)
        sorted_block = block.sort(dim=1).values  # ascending, for "how many are >= s" by binary search
        padded = torch.full((len(rows), max_r), -1, dtype=torch.long, device=scores.device)
        n_found = torch.tensor([len(p) for p in positives[start : start + chunk_size]], device=scores.device)
        n_pos = counts[start : start + chunk_size].to(scores.device)
        for r, p in enumerate(positives[start : start + chunk_size]):
            padded[r, : len(p)] = p.to(scores.device)
        valid = padded >= 0
        pos_scores = torch.where(valid, block.gather(1, padded.clamp(min=0)), -math.inf)
        pos_scores = pos_scores.sort(dim=1, descending=True).values  # padding (-inf) last
        at_or_above = block.shape[1] - torch.searchsorted(sorted_block, pos_scores, side="left")
        positives_at_or_above = (pos_scores[:, None, :] >= pos_scores[:, :, None]).logical_and(valid[:, None, :])
        negatives_before = at_or_above - positives_at_or_above.sum(-1)
        j = torch.arange(max_r, device=scores.device)
        place = j + negatives_before  # 0-based position of the j-th best positive
        within_r = (place < n_pos[:, None]) & (j < n_found[:, None])
        precision_at_hit = (j + 1).double() / (place + 1).double()
        totals[0] += float(((precision_at_hit * within_r).sum(1) / n_pos).sum())
        totals[1] += float((within_r.sum(1).double() / n_pos).sum())
        totals[2] += float(((place[:, 0] == 0) & (n_found > 0)).sum())
    totals /= len(query_rows)
    return {"map_at_r": float(totals[0]), "rprecision": float(totals[1]), "r1": float(totals[2])}


def eccv_metrics(
    similarity: Any,
    image_ids: Sequence[int],
    caption_ids: Sequence[int],
    i2t_positives: Mapping[Any, Sequence[Any]],
    t2i_positives: Mapping[Any, Sequence[Any]],
    chunk_size: int = 64,
) -> dict[str, float]:
    """ECCV Caption mAP@R, R-Precision and R@1 (percent) in both directions.

    Args:
        similarity: `(n_images, n_texts)` scores over the whole COCO 5K test split (5000 x 25010).
        image_ids: COCO image id of each row; caption_ids: COCO caption annotation id of each column.
        i2t_positives: ``{image_id: [caption ids]}`` (``eccv_image_to_caption.json``, see :func:`load_eccv_positives`);
            only these images are queries (1,261 in ECCV Caption).
        t2i_positives: ``{caption_id: [image ids]}`` (``eccv_caption_to_image.json``; 1,332 query captions).
            Positives outside ``image_ids`` / ``caption_ids`` are counted as never retrieved, with a warning, as the
            official code does (the official ``coco_test_ids.npy`` misses two of its own positives).

    Definitions follow Chun et al. 2022: for a query with R positives, R@1 = first result is positive,
    R-Precision = positives among the top R / R, mAP@R = (1/R) * sum_{r<=R} P@r * [result r is positive]
    (Musgrave et al. 2020). Full rankings are used (the reference ranks the top 50, which covers every R <= 48);
    ties are pessimistic as in :func:`retrieval_metrics`.

    Returns:
        ``{"eccv_map_at_r_i2t", "eccv_rprecision_i2t", "eccv_r1_i2t", ... "_t2i"}``.
    """
    matrix = _as_score_matrix(similarity, "similarity")
    if len(image_ids) != matrix.shape[0] or len(caption_ids) != matrix.shape[1]:
        raise ValueError(
            f"similarity is {tuple(matrix.shape)} but got {len(image_ids)} image ids and {len(caption_ids)} caption ids"
        )
    if torch.isnan(matrix).any():
        _raise_on_nan(matrix, "similarity")
    metrics = {}
    for direction, scores, positives, query_ids, item_ids in (
        ("i2t", matrix, i2t_positives, image_ids, caption_ids),
        ("t2i", matrix.T, t2i_positives, caption_ids, image_ids),
    ):
        if not positives:
            raise ValueError(f"ECCV {direction} positives are empty")
        rows, items, counts = _index_positives(positives, query_ids, item_ids, direction)
        for name, value in _map_at_r(scores, rows, items, counts, chunk_size).items():
            metrics[f"eccv_{name}_{direction}"] = 100.0 * value
    return metrics


# ------------------------------------------------------------------------------------------------------- uni-modal
def _label_codes(*label_lists: tuple[str, Sequence[Any], int]) -> list[torch.Tensor]:
    """Integer codes of hashable labels, shared across the lists so that equal labels get equal codes."""
    codes: dict[Any, int] = {}
    encoded = []
    for name, labels, expected in label_lists:
        labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
        if len(labels) != expected:
            raise ValueError(f"{name} has {len(labels)} entries but there are {expected} feature rows")
        encoded.append(torch.tensor([codes.setdefault(label, len(codes)) for label in labels], dtype=torch.long))
    return encoded


def image_retrieval_r1(
    features: torch.Tensor,
    labels: Sequence[Any],
    gallery_features: torch.Tensor | None = None,
    gallery_labels: Sequence[Any] | None = None,
    chunk_size: int = 1024,
) -> float:
    """Uni-modal image retrieval R@1 (percent) by cosine nearest neighbour.

    Without a gallery (CUB, SOP, iNaturalist protocol): every image queries all *other* images (leave-one-out) and
    counts as a hit when its nearest neighbour has its label. With ``gallery_features`` (In-Shop): each query's
    nearest gallery image. Features are L2-normalised first, so cosine and Euclidean neighbours coincide (the
    authors rank by Euclidean distance of normalised features). The query itself is excluded by index, not by
    dropping the first neighbour, so exact duplicates still count as neighbours; among equal similarities the
    lowest gallery index wins.

    Args:
        features: `(n_queries, dim)` image features; labels: `(n_queries,)` hashable class labels.
        gallery_features: optional `(n_gallery, dim)`; gallery_labels: its `(n_gallery,)` labels.
    """
    queries = F.normalize(torch.as_tensor(features).float(), dim=-1)
    if gallery_features is None:
        if len(queries) < 2:
            raise ValueError("leave-one-out retrieval needs at least 2 images")
        (query_codes,) = _label_codes(("labels", labels, len(queries)))
        gallery, gallery_codes = queries, query_codes
    else:
        if gallery_labels is None:
            raise ValueError("gallery_features given without gallery_labels")
        gallery = F.normalize(torch.as_tensor(gallery_features).float().to(queries.device), dim=-1)
        query_codes, gallery_codes = _label_codes(
            ("labels", labels, len(queries)), ("gallery_labels", gallery_labels, len(gallery))
        )
    query_codes, gallery_codes = query_codes.to(queries.device), gallery_codes.to(queries.device)
    hits = 0
    for start in range(0, len(queries), chunk_size):
        block = queries[start : start + chunk_size] @ gallery.T
        if gallery_features is None:
            rows = torch.arange(len(block), device=block.device)
            block[rows, rows + start] = -math.inf
        nearest = block.argmax(dim=1)
        hits += int((gallery_codes[nearest] == query_codes[start : start + len(block)]).sum())
    return 100.0 * hits / len(queries)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    order = values.argsort(stable=True)
    sorted_values = values[order]
    is_new = torch.ones_like(sorted_values, dtype=torch.bool)
    is_new[1:] = sorted_values[1:] != sorted_values[:-1]
    group = torch.cumsum(is_new, 0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64)
    group_sum = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    group_size = torch.bincount(group).double()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = (group_sum / group_size)[group]
    return ranks


def spearman_correlation(predicted: Any, gold: Any) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks), as ``scipy.stats.spearmanr``."""
    x = torch.as_tensor(predicted, dtype=torch.float64).flatten().cpu()
    y = torch.as_tensor(gold, dtype=torch.float64).flatten().cpu()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} predicted scores but {len(y)} gold scores")
    if len(x) < 2:
        raise ValueError("Spearman correlation needs at least 2 pairs")
    if torch.isnan(x).any() or torch.isnan(y).any():
        raise ValueError("Spearman correlation got NaN scores")
    rank_x, rank_y = _average_ranks(x) - (len(x) + 1) / 2, _average_ranks(y) - (len(y) + 1) / 2
    denominator = torch.sqrt((rank_x**2).sum() * (rank_y**2).sum())
    if denominator == 0:
        raise ValueError("Spearman correlation is undefined: one of the score lists is constant")
    return float((rank_x * rank_y).sum() / denominator)


def sts_spearman(embeddings1: torch.Tensor, embeddings2: torch.Tensor, gold_scores: Sequence[float]) -> float:
    """STS score: Spearman correlation (x100) between cosine similarity of sentence pairs and gold scores.

    The convention of sentence-transformers' ``EmbeddingSimilarityEvaluator`` (cosine, Spearman) and of SentEval's
    STS tasks as the CUSA authors run them (x100). Gold scores on any scale (0-5 STS-B, 1-5 SICK-R) give the same
    value, as Spearman only uses ranks. For STS12-16 "all", concatenate every subset's pairs and call once.
    """
    a, b = torch.as_tensor(embeddings1).float(), torch.as_tensor(embeddings2).float()
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings1 {tuple(a.shape)} and embeddings2 {tuple(b.shape)} must both be (n_pairs, dim)")
    cosine = F.cosine_similarity(a, b.to(a.device), dim=-1)
    return 100.0 * spearman_correlation(cosine, gold_scores)


# --------------------------------------------------------------------------------------------------------- loaders
@dataclass
class StsData:
    """Sentence pairs with gold similarity scores."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def _read_local_table(path: str) -> list[dict[str, Any]]:
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as handle:
            if lower.endswith(".json"):
                rows = json.load(handle)
                if not isinstance(rows, list):
                    raise ValueError(f"{path}: a .json table must be a list of row objects")
                return rows
            return [json.loads(line) for line in handle if line.strip()]
    if lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            # STS files contain quotes inside sentences; TSV is read without quote processing.
            if lower.endswith(".tsv"):
                return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(handle))
    raise ValueError(f"{path}: unsupported file type; use .csv, .tsv, .jsonl or .json")


def _load_rows(path_or_name: str, split: str, columns: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local table file or a Hub/`datasets` dataset split, checked for ``columns``."""
    if os.path.isfile(path_or_name):
        rows, source = _read_local_table(path_or_name), path_or_name
        available = set(rows[0]) if rows else set()
    else:
        import datasets

        dataset = datasets.load_dataset(path_or_name, split=split)
        rows, source, available = dataset, f"{path_or_name} [{split}]", set(dataset.column_names)
    if not len(rows):
        raise ValueError(f"{source} has no rows")
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; available: {sorted(available)}")
    return rows, source


def load_sts(
    path_or_name: str,
    split: str = "test",
    sentence1_column: str = "sentence1",
    sentence2_column: str = "sentence2",
    score_column: str = "score",
) -> StsData:
    """Load an STS set from a local .csv/.tsv/.jsonl/.json file or a Hub dataset (e.g. ``sentence-transformers/stsb``).

    ``split`` is used for Hub datasets only. Rows without a numeric score raise an error naming the row.
    """
    rows, source = _load_rows(path_or_name, split, (sentence1_column, sentence2_column, score_column))
    data = StsData([], [], [])
    for index, row in enumerate(rows):
        try:
            score = float(row[score_column])
        except (TypeError, ValueError):
            raise ValueError(f"{source} row {index}: {score_column}={row[score_column]!r} is not a number") from None
        if math.isnan(score):
            raise ValueError(f"{source} row {index}: {score_column} is NaN")
        data.sentences1.append(str(row[sentence1_column]))
        data.sentences2.append(str(row[sentence2_column]))
        data.scores.append(score)
    return data


@dataclass
class LabelledImages:
    """Images (paths, PIL images or ``datasets.Image`` values) with class labels, for uni-modal R@1."""

    images: list[Any]
    labels: list[Any]
    image_root: str | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_labelled_images(
    path_or_name: str,
    split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    image_root: str | None = None,
) -> LabelledImages:
    """Load a class-labelled image set.

    Accepts a folder with one sub-folder per class (ImageFolder layout, as CUB/``images``), a .csv/.tsv/.jsonl/.json
    table with image path and label columns (paths relative to ``image_root``, default the table's folder), or a Hub
    dataset name with ``split``.
    """
    if os.path.isdir(path_or_name):
        images, labels = [], []
        classes = sorted(e.name for e in os.scandir(path_or_name) if e.is_dir() and not e.name.startswith("."))
        for label in classes:
            folder = os.path.join(path_or_name, label)
            for name in sorted(os.listdir(folder)):
                if not name.startswith("."):  # skips macOS "._" resource files, as the CUB loaders do
                    images.append(os.path.join(folder, name))
                    labels.append(label)
        if not images:
            raise ValueError(f"{path_or_name}: no images in class sub-folders")
        return LabelledImages(images, labels, image_root)
    rows, _ = _load_rows(path_or_name, split, (image_column, label_column))
    if os.path.isfile(path_or_name) and image_root is None:
        image_root = os.path.dirname(os.path.abspath(path_or_name))
    return LabelledImages([row[image_column] for row in rows], [row[label_column] for row in rows], image_root)


# -------------------------------------------------------------------------------------------------------- encoding
def _unique(values: Sequence[Any]) -> tuple[list[Any], torch.Tensor]:
    """Unique values (strings and paths by value; other objects are kept as they are) and the inverse index."""
    unique: list[Any] = []
    first_index: dict[Any, int] = {}
    inverse = []
    for value in values:
        key = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if key is None:
            inverse.append(len(unique))
            unique.append(value)
        else:
            if key not in first_index:
                first_index[key] = len(unique)
                unique.append(value)
            inverse.append(first_index[key])
    return unique, torch.tensor(inverse, dtype=torch.long)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_features(output: Any) -> torch.Tensor:
    """Normalised float32 features from a tensor or a transformers output object (``pooler_output``)."""
    if not isinstance(output, torch.Tensor):
        output = output.pooler_output
    return F.normalize(output.float(), dim=-1)


def _encode(
    model: torch.nn.Module,
    n_items: int,
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    encode_batch: Callable[..., Any],
    batch_size: int,
    accelerator: Any,
    device: torch.device | str | None,
    show_progress: bool,
    desc: str,
) -> torch.Tensor:
    """Encode items ``0..n_items-1`` in batches; with an ``Accelerator`` each process encodes its shard and
    ``gather_for_metrics`` reassembles all ``n_items`` rows in order, dropping the padding of the last batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loader = torch.utils.data.DataLoader(list(range(n_items)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
        show_progress = show_progress and accelerator.is_local_main_process
    else:
        device = torch.device(device) if device is not None else _model_device(model)
    chunks = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, disable=not show_progress):
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                features = _as_features(encode_batch(**batch))
                if accelerator is not None:
                    features = accelerator.gather_for_metrics(features)
                chunks.append(features)
    finally:
        model.train(was_training)
    features = torch.cat(chunks)
    if len(features) != n_items:
        raise RuntimeError(f"encoded {len(features)} rows for {n_items} items; the gather lost or duplicated rows")
    return features


def _head_kwargs(head: str | None, get_features: Callable[..., Any]) -> dict[str, str]:
    if head is None:
        return {}
    if head not in ("cross", "uni"):
        raise ValueError(f"head={head!r} is not supported; use 'cross', 'uni' or None (a plain backbone)")
    if "head" not in inspect.signature(get_features).parameters:
        # A plain backbone's get_*_features takes **kwargs and would silently ignore head=.
        owner = type(getattr(get_features, "__self__", get_features)).__name__
        raise ValueError(
            f"head={head!r} selects a CusaModel's embeddings, but {owner}.{get_features.__name__} has no head "
            "parameter (a model without CUSA heads); use head=None for a plain backbone"
        )
    return {"head": head}


def encode_images(
    model: torch.nn.Module,
    images: Sequence[Any],
    image_processor: Any,
    batch_size: int = 64,
    head: str | None = "cross",
    image_root: str | None = None,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    num_workers: int = 0,
) -> torch.Tensor:
    """L2-normalised `(len(images), dim)` float32 features, on the compute device, in the order of ``images``.

    Args:
        model: a ``CusaModel`` (``get_image_features(pixel_values=..., head=...)``); with ``head=None`` any model whose
            ``get_image_features(pixel_values=...)`` returns features or an output with ``pooler_output`` (a plain
            ``CLIPModel`` baseline).
        images: paths (relative to ``image_root``), PIL images or ``datasets.Image`` values; equal paths are
            decoded and encoded once.
        image_processor: e.g. ``CLIPImageProcessor``.
        head: ``"cross"`` (retrieval) or ``"uni"`` (USA head, uni-modal tasks).
        accelerator: an ``accelerate.Accelerator``; every process gets the full features.
        device: where to compute without an accelerator (default: the model's device).
        num_workers: DataLoader workers decoding images.
    """
    unique, inverse = _unique(images)

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        pil_images = [load_image(unique[i], image_root, where=f"image {i}") for i in indices]
        return {"pixel_values": image_processor(images=pil_images, return_tensors="pt")["pixel_values"]}

    kwargs = _head_kwargs(head, model.get_image_features)

    def encode_batch(pixel_values: torch.Tensor) -> Any:
        return model.get_image_features(pixel_values=pixel_values, **kwargs)

    features = _encode(model, len(unique), collate, encode_batch, batch_size, accelerator, device, show_progress,
                       "encoding images")
    return features[inverse.to(features.device)]


def encode_texts(
    model: torch.nn.Module,
    captions: Sequence[str],
    tokenizer: Any,
    batch_size: int = 256,
    head: str | None = "cross",
    max_length: int | None = None,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """L2-normalised `(len(captions), dim)` float32 text features; duplicate captions are encoded once.

    Captions are truncated to ``max_length`` tokens (default: ``tokenizer.model_max_length``, 77 for CLIP).
    Other arguments as in :func:`encode_images`.
    """
    unique, inverse = _unique([str(c) for c in captions])
    if max_length is None and getattr(tokenizer, "model_max_length", None) is None:
        raise ValueError("the tokenizer has no model_max_length; pass max_length")

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        tokens = tokenizer([unique[i] for i in indices], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    kwargs = _head_kwargs(head, model.get_text_features)

    def encode_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    features = _encode(model, len(unique), collate, encode_batch, batch_size, accelerator, device, show_progress,
                       "encoding texts")
    return features[inverse.to(features.device)]


def _project_tower_features(
    model: torch.nn.Module, modality: str, tower_features: torch.Tensor, head: str | None, accelerator: Any, device: Any
) -> torch.Tensor:
    """Normalised embeddings from a frozen tower's cached output (``RetrievalEvalView.*_tower_features``): the
    projections and heads only, computed whole in every process (they are small)."""
    if head is None:
        raise ValueError("cached tower features need a CusaModel and a head ('cross' or 'uni')")
    device = accelerator.device if accelerator is not None else (device or _model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            features = getattr(model, f"get_{modality}_features")(
                **{f"{modality}_tower_features": tower_features.to(device)}, head=head
            )
    finally:
        model.train(was_training)
    return _as_features(features)


def _unwrap(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    eval_view: RetrievalEvalView,
    batch_size: int = 64,
    text_batch_size: int = 256,
    accelerator: Any = None,
    head: str | None = "cross",
    rerank: RerankConfig | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Encode an evaluation split once and compute the COCO/Flickr retrieval metrics.

    Args:
        processor: a transformers processor with ``.image_processor`` and ``.tokenizer`` (``CLIPProcessor``,
            ``VisionTextDualEncoderProcessor``).
        eval_view: the split's unique images, captions and caption -> image map (``RetrievalEvalView``).
        rerank: optional :class:`RerankConfig`; its ``itm_score`` takes indices into ``eval_view.images`` /
            ``eval_view.captions``.

    Returns:
        ``{"i2t_r1", ..., "t2i_r10", "rsum"}`` (percent); with ``rerank`` these are the reranked numbers and the
        dual-encoder ones are added with an ``itc_`` prefix. ``CusaTrainer`` reports them as ``eval_*``.
    """
    model = _unwrap(model, accelerator)
    if eval_view.image_tower_features is not None:
        image_features = _project_tower_features(model, "image", eval_view.image_tower_features, head, accelerator, device)
    else:
        image_features = encode_images(model, eval_view.images, processor.image_processor, batch_size, head,
                                       eval_view.image_root, accelerator, device, show_progress)
    if eval_view.text_tower_features is not None:
        text_features = _project_tower_features(model, "text", eval_view.text_tower_features, head, accelerator, device)
    else:
        text_features = encode_texts(model, eval_view.captions, processor.tokenizer, text_batch_size, head,
                                     accelerator=accelerator, device=device, show_progress=show_progress)
    similarity = image_features @ text_features.T
    metrics = retrieval_metrics(similarity, eval_view.text_to_image)
    if rerank is None:
        return metrics
    i2t_scores, t2i_scores = rerank_with_itm(similarity, rerank.itm_score, rerank.k_i2t, rerank.k_t2i,
                                             rerank.batch_size, show_progress)
    reranked = retrieval_metrics(i2t_scores, eval_view.text_to_image, t2i_similarity=t2i_scores)
    return {**reranked, **{f"itc_{name}": value for name, value in metrics.items()}}


def evaluate_sts(
    model: torch.nn.Module,
    tokenizer: Any,
    data: StsData,
    head: str | None = "uni",
    batch_size: int = 256,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> float:
    """STS Spearman x100 of a model's text features (``head="uni"``: the USA text head, as the paper's STS rows)."""
    model = _unwrap(model, accelerator)
    features = encode_texts(model, data.sentences1 + data.sentences2, tokenizer, batch_size, head,
                            accelerator=accelerator, device=device, show_progress=show_progress)
    return sts_spearman(features[: len(data)], features[len(data) :], data.scores)


def evaluate_image_retrieval(
    model: torch.nn.Module,
    image_processor: Any,
    data: LabelledImages,
    gallery: LabelledImages | None = None,
    head: str | None = "uni",
    batch_size: int = 64,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> float:
    """Uni-modal image retrieval R@1 of a model's image features (leave-one-out, or query -> ``gallery``)."""
    model = _unwrap(model, accelerator)

    def features_of(images: LabelledImages) -> torch.Tensor:
        return encode_images(model, images.images, image_processor, batch_size, head, images.image_root, accelerator,
                             device, show_progress)

    if gallery is None:
        return image_retrieval_r1(features_of(data), data.labels)
    return image_retrieval_r1(features_of(data), data.labels, features_of(gallery), gallery.labels)
