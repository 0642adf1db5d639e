"""Uni-modal metrics: image retrieval R@1 (leave-one-out and query -> gallery), STS Spearman, and their loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cusa_hf.evaluation.loaders import load_labelled_images, load_sts
from cusa_hf.evaluation.unimodal import image_retrieval_r1, spearman_correlation, sts_spearman

FIXTURES = Path(__file__).parent / "fixtures"


def test_leave_one_out_r1_hand_checked():
    # Unit vectors at angles 0, 10, 100, 110, 200 degrees; labels a a b a b.
    angles = np.deg2rad([0, 10, 100, 110, 200])
    features = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32) * 3  # unnormalised
    labels = ["a", "a", "b", "a", "b"]
    # nearest other: 0->1 (a=a hit), 1->0 (hit), 2->3 (b!=a miss), 3->2 (a!=b miss),
    # 4 (200 deg) -> 3 (110 deg, 90 deg away; 2 is 100 away, 1 is 170 away) (b!=a miss). 2 hits / 5.
    assert image_retrieval_r1(features, labels) == pytest.approx(40.0)


def test_leave_one_out_matches_authors_euclidean_rule_without_duplicates():
    """The authors take the second-nearest Euclidean neighbour of normalised features (the first being the query)."""
    rng = np.random.default_rng(0)
    features = torch.tensor(rng.normal(size=(60, 8)), dtype=torch.float32)
    labels = rng.integers(0, 5, 60)
    normalised = torch.nn.functional.normalize(features, dim=-1)
    second_nearest = torch.cdist(normalised, normalised).topk(2, largest=False).indices[:, 1]
    expected = 100.0 * float((torch.tensor(labels)[second_nearest] == torch.tensor(labels)).double().mean())
    assert image_retrieval_r1(features, labels, chunk_size=7) == pytest.approx(expected)


def test_duplicate_features_still_count_as_neighbours():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert image_retrieval_r1(features, [0, 0, 1]) == pytest.approx(100 * 2 / 3)


def test_query_gallery_r1():
    queries = torch.tensor([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.0, -1.0]])
    # nearest gallery: q0->g0 (shirt=shirt), q1->g1 (dress vs shoe: miss), q2->g1 or g2? (-1,0): cos g0=-1, g1=-0.1/1.005,
    # g2=0 -> g2 (shoe = shoe)
    r1 = image_retrieval_r1(queries, ["shirt", "dress", "shoe"], gallery, ["shirt", "shoe", "shoe"])
    assert r1 == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="gallery_labels has 2 entries"):
        image_retrieval_r1(queries, ["a", "b", "c"], gallery, ["a", "b"])


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    predicted = rng.integers(0, 6, 200).astype(float)
    gold = predicted + rng.integers(-3, 4, 200)
    assert spearman_correlation(predicted, gold) == pytest.approx(stats.spearmanr(predicted, gold).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        spearman_correlation([1, 1, 1], [1, 2, 3])


def test_sts_spearman_matches_sentence_transformers_convention():
    """sentence-transformers' EmbeddingSimilarityEvaluator: spearmanr(gold, 1 - paired cosine distance)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    gold = rng.uniform(0, 5, 30)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = 100 * stats.spearmanr(gold, cosine).statistic
    assert sts_spearman(torch.tensor(a), torch.tensor(b), gold) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name,pairs", [("sts_tiny.csv", 5), ("sts_tiny.tsv", 3), ("sts_tiny.jsonl", 3)])
def test_load_sts_local_files(name, pairs):
    data = load_sts(str(FIXTURES / name))
    assert len(data) == pairs
    assert data.sentences1[0] == "A man is playing a guitar." and data.scores[0] == 4.8
    if name.endswith(".csv"):
        assert data.sentences1[2] == "A dog runs on the grass, fast."  # quoted comma
    if name.endswith(".tsv"):
        assert data.sentences1[2] == '"A dog" runs on the grass.'  # quotes kept verbatim


def test_load_sts_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,sentence2,score\na,b,high\n")
    with pytest.raises(ValueError, match="bad.csv row 0: score='high'"):
        load_sts(str(bad))
    with pytest.raises(ValueError, match="missing column\\(s\\) \\['label'\\]"):
        load_sts(str(FIXTURES / "sts_tiny.csv"), score_column="label")


def test_load_labelled_images_folder_and_table():
    from_folder = load_labelled_images(str(FIXTURES / "labelled_images"))
    assert from_folder.labels == ["cat"] * 3 + ["dog"] * 3
    from_table = load_labelled_images(str(FIXTURES / "labelled_images.csv"))
    assert from_table.labels == from_folder.labels
    assert from_table.image_root == str(FIXTURES.resolve())
    assert [Path(from_table.image_root, p).resolve() for p in from_table.images] == [
        Path(p).resolve() for p in from_folder.images
    ]
