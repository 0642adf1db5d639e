"""Uni-modal metrics: image retrieval R@1 on class-labelled images, and STS Spearman of sentence pairs.

* **Image retrieval R@1** (:func:`image_retrieval_r1`): leave-one-out nearest neighbour by cosine similarity on a
  class-labelled image set (CUB, SOP, iNaturalist), or query -> gallery (In-Shop).
* **STS** (:func:`sts_spearman`): Spearman correlation between cosine similarity and gold scores.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats


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


def spearman_correlation(predicted: Any, gold: Any) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``: Pearson correlation of ranks, ties given their average
    rank) of two equally long score lists, computed in float64.

    Raises:
        ValueError: the lists differ in length, have fewer than 2 entries, hold NaN, or one is constant (where the
            correlation is undefined; SciPy would return NaN).
    """
    x = torch.as_tensor(predicted, dtype=torch.float64).flatten().cpu().numpy()
    y = torch.as_tensor(gold, dtype=torch.float64).flatten().cpu().numpy()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} predicted scores but {len(y)} gold scores")
    if len(x) < 2:
        raise ValueError("Spearman correlation needs at least 2 pairs")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("Spearman correlation got NaN scores")
    if (x == x[0]).all() or (y == y[0]).all():
        raise ValueError("Spearman correlation is undefined: one of the score lists is constant")
    return float(stats.spearmanr(x, y).statistic)


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
