"""Retrieval metrics, reranking and pairwise scoring against simple per-query references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cusa_hf.evaluation.metrics import RETRIEVAL_METRIC_NAMES, recalls_from_ranks, retrieval_metrics, retrieval_ranks
from cusa_hf.evaluation.reranking import pairwise_similarity, rerank_with_itm


# ------------------------------------------------------------------------------------------------ references
def reference_ranks(i2t_scores, text_to_image, t2i_scores=None, ties="pessimistic"):
    """Per-query sort, the authors' loop generalised to ties: positives go after (pessimistic) or before
    (optimistic) equal-scored items; the rank is the first position holding a positive."""
    i2t_scores = np.asarray(i2t_scores, dtype=np.float64)
    t2i_scores = i2t_scores if t2i_scores is None else np.asarray(t2i_scores, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    n_images, n_texts = i2t_scores.shape

    def first_positive(scores, is_positive):
        tie_key = is_positive if ties == "pessimistic" else ~is_positive
        order = np.lexsort((tie_key, -scores))  # primary: score descending; secondary: tie rule
        return int(np.flatnonzero(is_positive[order])[0])

    i2t = [first_positive(i2t_scores[i], text_to_image == i) for i in range(n_images)]
    t2i = [first_positive(t2i_scores[:, t], np.arange(n_images) == text_to_image[t]) for t in range(n_texts)]
    return np.array(i2t), np.array(t2i)


def authors_argsort_ranks(scores_i2t, text_to_image):
    """The CUSA authors' loop (``itm_eval``): ``argsort(score)[::-1]`` per query; exact on tie-free scores."""
    image_to_texts = [np.flatnonzero(text_to_image == i) for i in range(scores_i2t.shape[0])]
    i2t = []
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]
        i2t.append(min(np.where(order == t)[0][0] for t in image_to_texts[index]))
    t2i = []
    for index, score in enumerate(scores_i2t.T):
        order = np.argsort(score)[::-1]
        t2i.append(np.where(order == text_to_image[index])[0][0])
    return np.array(i2t), np.array(t2i)


def random_text_to_image(n_images, rng, max_captions=6):
    """Every image gets 1..max_captions captions, shuffled among the columns."""
    counts = rng.integers(1, max_captions + 1, size=n_images)
    mapping = np.repeat(np.arange(n_images), counts)
    return rng.permutation(mapping)


SHAPES = [1, 2, 7, 40, 123]


# ---------------------------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("n_images", SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_ranks_match_argsort_loop_on_tie_free_scores(n_images, chunk_size):
    rng = np.random.default_rng(n_images)
    text_to_image = random_text_to_image(n_images, rng)
    scores = rng.normal(size=(n_images, len(text_to_image)))  # float64: no ties
    expected = authors_argsort_ranks(scores, text_to_image)
    for ties in ("pessimistic", "optimistic"):
        i2t, t2i = retrieval_ranks(scores, text_to_image, chunk_size=chunk_size, ties=ties)
        np.testing.assert_array_equal(i2t.numpy(), expected[0])
        np.testing.assert_array_equal(t2i.numpy(), expected[1])


@pytest.mark.parametrize("n_images", SHAPES)
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64])
def test_ranks_with_ties_match_reference(n_images, ties, dtype):
    rng = np.random.default_rng(100 + n_images)
    text_to_image = random_text_to_image(n_images, rng)
    scores = rng.integers(0, 4, size=(n_images, len(text_to_image)))  # heavy ties
    similarity = torch.tensor(scores).to(dtype)
    i2t, t2i = retrieval_ranks(similarity, torch.tensor(text_to_image), chunk_size=3, ties=ties)
    expected = reference_ranks(scores, text_to_image, ties=ties)
    np.testing.assert_array_equal(i2t.numpy(), expected[0])
    np.testing.assert_array_equal(t2i.numpy(), expected[1])


def test_separate_t2i_matrix_ranks_text_queries():
    rng = np.random.default_rng(3)
    text_to_image = random_text_to_image(17, rng)
    i2t_scores = rng.normal(size=(17, len(text_to_image))).astype(np.float32)
    t2i_scores = rng.normal(size=(17, len(text_to_image))).astype(np.float32)
    i2t, t2i = retrieval_ranks(i2t_scores, text_to_image, t2i_similarity=t2i_scores, chunk_size=4)
    expected = reference_ranks(i2t_scores, text_to_image, t2i_scores)
    np.testing.assert_array_equal(i2t.numpy(), expected[0])
    np.testing.assert_array_equal(t2i.numpy(), expected[1])


def test_infinite_scores_and_infinite_positive():
    """-inf/+inf entries (masked scores) are ranked like any number, including a positive equal to -inf."""
    scores = np.array(
        [
            [-np.inf, 0.5, -np.inf, 0.1, np.inf],
            [-np.inf, -np.inf, 0.3, -np.inf, 0.2],
            [0.0, -np.inf, -np.inf, np.inf, -np.inf],
        ]
    )
    text_to_image = np.array([0, 1, 2, 0, 2])
    for ties in ("pessimistic", "optimistic"):
        i2t, t2i = retrieval_ranks(torch.tensor(scores, dtype=torch.float32), text_to_image, chunk_size=2, ties=ties)
        expected = reference_ranks(scores, text_to_image, ties=ties)
        np.testing.assert_array_equal(i2t.numpy(), expected[0])
        np.testing.assert_array_equal(t2i.numpy(), expected[1])


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_checked():
    # 3 images; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.2],  # best caption (1) at place 0
            [0.7, 0.6, 0.5, 0.1, 0.9],  # captions 2 (0.5), 3 (0.1); 0.7, 0.6, 0.9 above -> rank 3
            [0.3, 0.2, 0.1, 0.4, 0.0],  # caption 4 last of 5 -> rank 4
        ]
    )
    text_to_image = [0, 0, 1, 1, 2]
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    assert i2t.tolist() == [0, 3, 4]
    # column ranks: caption0 image0 0.1 vs 0.7,0.3 -> 2; caption1 0.9 -> 0; caption2 0.5 vs 0.8 -> 1;
    # caption3 0.1 vs 0.0, 0.4 -> 1; caption4 0.0 vs 0.2, 0.9 -> 2
    assert t2i.tolist() == [2, 0, 1, 1, 2]
    metrics = retrieval_metrics(similarity, text_to_image)
    assert list(metrics) == list(RETRIEVAL_METRIC_NAMES)
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == pytest.approx(100.0)
    assert metrics["t2i_r1"] == pytest.approx(20.0)
    assert metrics["t2i_r5"] == pytest.approx(100.0)
    assert metrics["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 20 + 100 + 100)


def test_constant_scores_are_not_rewarded():
    metrics = retrieval_metrics(torch.zeros(20, 100), torch.arange(100) % 20)
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0 and metrics["i2t_r10"] == 0.0
    optimistic = retrieval_metrics(torch.zeros(20, 100), torch.arange(100) % 20, ties="optimistic")
    assert optimistic["rsum"] == 600.0


def test_recalls_from_ranks():
    metrics = recalls_from_ranks(torch.tensor([0, 4, 9, 10]), torch.tensor([1, 0]))
    assert metrics["i2t_r1"] == 25.0 and metrics["i2t_r5"] == 50.0 and metrics["i2t_r10"] == 75.0
    assert metrics["t2i_r1"] == 50.0 and metrics["t2i_r5"] == 100.0
    assert metrics["rsum"] == 25 + 50 + 75 + 50 + 100 + 100


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(5)
    text_to_image = random_text_to_image(30, rng)
    scores = rng.normal(size=(30, len(text_to_image))).astype(np.float32)
    assert retrieval_metrics(scores, text_to_image) == retrieval_metrics(torch.from_numpy(scores),
                                                                         torch.tensor(text_to_image))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    text_to_image = random_text_to_image(300, rng)
    scores = torch.tensor(rng.normal(size=(300, len(text_to_image))), dtype=torch.float32)
    assert retrieval_metrics(scores.cuda(), text_to_image) == retrieval_metrics(scores, text_to_image)


# ----------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="contains NaN.*image 1, text 2"):
        scores = torch.zeros(2, 3)
        scores[1, 2] = math.nan
        retrieval_metrics(scores, [0, 1, 1])
    with pytest.raises(ValueError, match="contains NaN.*image 0, text 1"):
        scores = torch.rand(2, 3)
        scores[0, 1] = math.nan  # a negative of image 0, a positive's column for t2i
        retrieval_metrics(scores, [0, 1, 1])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.rand(3, 3), [0, 0, 1])
    with pytest.raises(ValueError, match="expected shape \\(3,\\)"):
        retrieval_metrics(torch.rand(2, 3), [0, 1])
    with pytest.raises(ValueError, match="text_to_image\\[1\\] = 5"):
        retrieval_metrics(torch.rand(2, 3), [0, 5, 1])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.rand(6), [0, 1])
    with pytest.raises(ValueError, match="ties="):
        retrieval_metrics(torch.rand(2, 2), [0, 1], ties="random")
    with pytest.raises(ValueError, match="t2i_similarity has shape"):
        retrieval_metrics(torch.rand(2, 2), [0, 1], t2i_similarity=torch.rand(2, 3))


# --------------------------------------------------------------------------------------------- pairwise scores
def test_pairwise_similarity_assembles_blocks():
    full = torch.randn(11, 23)
    calls = []

    def score_fn(image_idx, text_idx):
        calls.append((len(image_idx), len(text_idx)))
        return full[image_idx][:, text_idx]

    result = pairwise_similarity(score_fn, 11, 23, image_chunk=4, text_chunk=10, show_progress=False)
    torch.testing.assert_close(result, full, rtol=0, atol=0)
    assert len(calls) == 3 * 3 and max(calls) == (4, 10)
    with pytest.raises(ValueError, match="expected \\(4, 10\\)"):
        pairwise_similarity(lambda i, t: torch.zeros(1, 1), 11, 23, 4, 10, show_progress=False)


# ----------------------------------------------------------------------------------------------------- rerank
def brute_force_rerank(similarity, itm, k_i2t, k_t2i):
    """Per-query loop of the X2VLM protocol with our fill rule (below every candidate of the matrix)."""
    n_images, n_texts = similarity.shape
    i2t = np.full((n_images, n_texts), np.nan)
    t2i = np.full((n_images, n_texts), np.nan)
    for i in range(n_images):
        top = np.argsort(-similarity[i], kind="stable")[:k_i2t]
        i2t[i, top] = itm[i, top]
    for t in range(n_texts):
        top = np.argsort(-similarity[:, t], kind="stable")[:k_t2i]
        t2i[top, t] = itm[top, t]
    return i2t, t2i


@pytest.mark.parametrize("k", [(1, 1), (3, 2), (5, 4), (100, 100)])
def test_rerank_scores_candidates_and_fills_below(k):
    rng = np.random.default_rng(7)
    text_to_image = random_text_to_image(9, rng, max_captions=3)
    similarity = rng.normal(size=(9, len(text_to_image))).astype(np.float32)
    itm = rng.normal(loc=-500.0, scale=50.0, size=similarity.shape).astype(np.float32)  # far below X2VLM's -100
    pairs_seen = []

    def itm_score(image_idx, text_idx):
        assert image_idx.dtype == torch.long and image_idx.shape == text_idx.shape
        pairs_seen.extend(zip(image_idx.tolist(), text_idx.tolist()))
        return torch.from_numpy(itm)[image_idx, text_idx]

    i2t_scores, t2i_scores = rerank_with_itm(similarity, itm_score, *k, batch_size=5, show_progress=False)
    expected_i2t, expected_t2i = brute_force_rerank(similarity, itm, *k)
    for got, expected in ((i2t_scores.numpy(), expected_i2t), (t2i_scores.numpy(), expected_t2i)):
        candidates = ~np.isnan(expected)
        np.testing.assert_array_equal(got[candidates], expected[candidates])
        fill = got[~candidates]
        if fill.size:
            assert np.all(fill == fill[0]) and fill[0] < expected[candidates].min()
    k_i2t, k_t2i = min(k[0], similarity.shape[1]), min(k[1], similarity.shape[0])
    assert len(pairs_seen) == 9 * k_i2t + len(text_to_image) * k_t2i
    metrics = retrieval_metrics(i2t_scores, text_to_image, t2i_similarity=t2i_scores)
    if k_i2t == similarity.shape[1] and k_t2i == similarity.shape[0]:
        assert metrics == retrieval_metrics(itm, text_to_image)  # everything rescored: pure ITM ranking


def test_rerank_rejects_bad_scores():
    similarity = torch.rand(3, 4)
    with pytest.raises(ValueError, match="non-finite"):
        rerank_with_itm(similarity, lambda i, t: torch.full(i.shape, math.nan), 2, 2, show_progress=False)
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        rerank_with_itm(similarity, lambda i, t: torch.zeros(1), 2, 2, batch_size=2, show_progress=False)
