"""Score matrices of backbones that score image-text pairs themselves (SGRAF), and fusion-encoder ITM reranking of a
dual encoder's top-k (the X2VLM/BLIP protocol)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..backbones import ItmScoreFn
from .metrics import _as_score_matrix

#: ``score_fn(image_idx, text_idx)``: the `(len(image_idx), len(text_idx))` block of a score matrix.
BlockScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

