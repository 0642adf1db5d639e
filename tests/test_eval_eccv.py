"""ECCV Caption mAP@R / R-Precision / R@1: a hand-checked example and a per-query reference on random scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cusa_hf.evaluation import eccv_metrics, load_eccv_positives

FIXTURES = Path(__file__).parent / "fixtures" / "eccv_tiny"
IMAGE_IDS = [101, 102, 103]
CAPTION_IDS = [11, 12, 13, 14, 15, 16]
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],  # 101: 11, 13, 15, 14, 16, 12
        [0.2, 0.6, 0.5, 0.9, 0.1, 0.4],  # 102: 14, 12, 13, 16, 11, 15
        [0.5, 0.3, 0.1, 0.2, 0.6, 0.3],  # 103
    ]
)


def test_load_eccv_positives_reads_the_chun_format():
    assert load_eccv_positives(FIXTURES / "eccv_image_to_caption.json") == {101: [11, 12, 15], 102: [13, 14]}
    assert load_eccv_positives(FIXTURES / "eccv_caption_to_image.json") == {11: [101, 103], 16: [103]}


def test_hand_checked_values():
    metrics = eccv_metrics(
        SIMILARITY,
        IMAGE_IDS,
        CAPTION_IDS,
        load_eccv_positives(FIXTURES / "eccv_image_to_caption.json"),
        load_eccv_positives(FIXTURES / "eccv_caption_to_image.json"),
    )
    # i2t 101 (R=3): 11 hit, 13 miss, 15 hit -> AP = (1 + 2/3)/3 = 5/9, RP = 2/3, R@1 = 1
    # i2t 102 (R=2): 14 hit, 12 miss         -> AP = 1/2,             RP = 1/2, R@1 = 1
    assert metrics["eccv_map_at_r_i2t"] == pytest.approx(100 * (5 / 9 + 1 / 2) / 2)
    assert metrics["eccv_rprecision_i2t"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert metrics["eccv_r1_i2t"] == pytest.approx(100.0)
    # t2i 11 (R=2): column (0.9, 0.2, 0.5) -> 101, 103 both positive -> 1, 1, 1
    # t2i 16 (R=1): column (0.2, 0.4, 0.3) -> 102 first, a miss      -> 0, 0, 0
    assert metrics["eccv_map_at_r_t2i"] == pytest.approx(50.0)
    assert metrics["eccv_rprecision_t2i"] == pytest.approx(50.0)
    assert metrics["eccv_r1_t2i"] == pytest.approx(50.0)


def reference_eccv(scores, positives):
    """Definition of Chun et al. on an explicit ranked list per query (pessimistic ties: positives last)."""
    maps, rps, r1s = [], [], []
    for query, items in positives.items():
        is_positive = np.zeros(scores.shape[1], dtype=bool)
        is_positive[items] = True
        ranked = is_positive[np.lexsort((is_positive, -scores[query]))]
        r = int(is_positive.sum())
        hits = ranked[:r]
        precision_at = np.cumsum(hits) / np.arange(1, r + 1)
        maps.append(float((precision_at * hits).sum() / r))
        rps.append(float(hits.sum() / r))
        r1s.append(float(ranked[0]))
    return 100 * np.mean(maps), 100 * np.mean(rps), 100 * np.mean(r1s)


@pytest.mark.parametrize("integer_scores", [False, True])
def test_matches_reference_on_random_scores(integer_scores):
    rng = np.random.default_rng(int(integer_scores))
    n_images, n_texts = 23, 61
    scores = rng.integers(0, 5, (n_images, n_texts)) if integer_scores else rng.normal(size=(n_images, n_texts))
    i2t = {i: sorted(rng.choice(n_texts, rng.integers(1, 9), replace=False).tolist()) for i in range(0, n_images, 2)}
    t2i = {t: sorted(rng.choice(n_images, rng.integers(1, 6), replace=False).tolist()) for t in range(0, n_texts, 3)}
    image_ids = [1000 + i for i in range(n_images)]
    caption_ids = [5 * t for t in range(n_texts)]
    metrics = eccv_metrics(
        torch.tensor(scores, dtype=torch.float32),
        image_ids,
        caption_ids,
        {image_ids[i]: [caption_ids[t] for t in items] for i, items in i2t.items()},
        {str(caption_ids[t]): [image_ids[i] for i in items] for t, items in t2i.items()},  # string keys, as JSON
        chunk_size=4,
    )
    expected_i2t = reference_eccv(np.asarray(scores, dtype=np.float64), i2t)
    expected_t2i = reference_eccv(np.asarray(scores, dtype=np.float64).T, t2i)
    got_i2t = (metrics["eccv_map_at_r_i2t"], metrics["eccv_rprecision_i2t"], metrics["eccv_r1_i2t"])
    got_t2i = (metrics["eccv_map_at_r_t2i"], metrics["eccv_rprecision_t2i"], metrics["eccv_r1_t2i"])
    np.testing.assert_allclose(got_i2t, expected_i2t, rtol=1e-12)
    np.testing.assert_allclose(got_t2i, expected_t2i, rtol=1e-12)


def test_ids_outside_the_evaluated_split_are_errors():
    i2t = {101: [11, 99]}
    with pytest.raises(ValueError, match="positive ids \\[99\\]"):
        eccv_metrics(SIMILARITY, IMAGE_IDS, CAPTION_IDS, i2t, {11: [101]})
    with pytest.raises(ValueError, match="query id 7"):
        eccv_metrics(SIMILARITY, IMAGE_IDS, CAPTION_IDS, {7: [11]}, {11: [101]})
    with pytest.raises(ValueError, match="2 image ids"):
        eccv_metrics(SIMILARITY, IMAGE_IDS[:2], CAPTION_IDS, {101: [11]}, {11: [101]})


def test_bad_positive_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"1": []}')
    with pytest.raises(ValueError, match="bad.json: query '1'"):
        load_eccv_positives(path)
