"""ECCV Caption mAP@R / R-Precision / R@1: a hand-checked example and a per-query reference on random scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cusa_hf.evaluation.eccv import eccv_metrics, load_eccv_positives

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


def test_positives_outside_the_evaluated_items_count_as_never_retrieved():
    # 101 ranks 11 first: with the unreachable positive 99, R = 2 and one of the two places holds a positive.
    with pytest.warns(UserWarning, match="1 positive id\\(s\\) are not among the evaluated items .*positive 99"):
        metrics = eccv_metrics(SIMILARITY, IMAGE_IDS, CAPTION_IDS, {101: [11, 99]}, {11: [101]})
    assert metrics["eccv_r1_i2t"] == 100.0
    assert metrics["eccv_rprecision_i2t"] == pytest.approx(50.0)
    assert metrics["eccv_map_at_r_i2t"] == pytest.approx(50.0)  # (1/R) * P@1 = 1/2


def test_matches_the_official_eccv_caption_code_on_its_own_ground_truth():
    """The official package (pip install eccv-caption) and its ECCV positives: random scores over a slice of its
    queries, with many positives outside the slice (counted as never retrieved by both)."""
    official = pytest.importorskip("eccv_caption._metrics")
    import eccv_caption

    data = Path(eccv_caption.__file__).parent / "data"
    i2t_all = load_eccv_positives(data / "eccv_image_to_caption.json")
    t2i_all = load_eccv_positives(data / "eccv_caption_to_image.json")
    image_ids = sorted(i2t_all)[:60]
    caption_ids = sorted({c for i in image_ids for c in i2t_all[i]} | set(sorted(t2i_all)[:200]))
    i2t = {i: i2t_all[i] for i in image_ids}
    t2i = {c: t2i_all[c] for c in caption_ids if c in t2i_all}
    image_ids = sorted(set(image_ids) | {i for c in list(t2i)[:40] for i in t2i[c]})
    scores = torch.from_numpy(np.random.default_rng(0).permutation(len(image_ids) * len(caption_ids)).astype(np.float64))
    similarity = scores.reshape(len(image_ids), len(caption_ids))  # distinct values: no ties
    with pytest.warns(UserWarning, match="not among the evaluated items"):
        ours = eccv_metrics(similarity, image_ids, caption_ids, i2t, t2i)
    i2t_ranked = {i: [caption_ids[j] for j in similarity[row].argsort(descending=True).tolist()]
                  for row, i in enumerate(image_ids)}  # fmt: skip
    t2i_ranked = {c: [image_ids[j] for j in similarity[:, col].argsort(descending=True).tolist()]
                  for col, c in enumerate(caption_ids)}  # fmt: skip
    for direction, ranked, gts in (("i2t", i2t_ranked, i2t), ("t2i", t2i_ranked, t2i)):
        reference = official.compute_eccv_metrics(ranked, gts)
        for name in ("map_at_r", "rprecision", "r1"):
            assert ours[f"eccv_{name}_{direction}"] == pytest.approx(100.0 * reference[f"eccv_{name}"], abs=1e-9), (
                direction, name
            )


def test_ids_outside_the_evaluated_split_are_errors():
    with pytest.raises(ValueError, match="query id 7"):
        eccv_metrics(SIMILARITY, IMAGE_IDS, CAPTION_IDS, {7: [11]}, {11: [101]})
    with pytest.raises(ValueError, match="2 image ids"):
        eccv_metrics(SIMILARITY, IMAGE_IDS[:2], CAPTION_IDS, {101: [11]}, {11: [101]})


def test_bad_positive_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"1": []}')
    with pytest.raises(ValueError, match="bad.json: query '1'"):
        load_eccv_positives(path)
