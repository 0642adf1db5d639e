"""ECCV Caption metrics (Chun et al. 2022): mAP@R, R-Precision and R@1 with the extended positives of the COCO 5K
test split."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import torch

from .metrics import _as_score_matrix, _raise_on_nan


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
