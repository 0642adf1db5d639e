"""The `evaluate` retrieval_recall module (offline, from its local folder) and the speed benchmark's quick mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cusa_hf.evaluation.metrics import retrieval_metrics


def test_retrieval_recall_module_equals_retrieval_metrics():
    evaluate = pytest.importorskip("evaluate")
    from cusa_hf.evaluation.evaluate_modules import RETRIEVAL_RECALL_PATH

    rng = np.random.default_rng(0)
    text_to_image = rng.permutation(np.repeat(np.arange(12), rng.integers(1, 5, 12)))
    scores = rng.normal(size=(12, len(text_to_image))).astype(np.float32)
    metric = evaluate.load(RETRIEVAL_RECALL_PATH)
    for start in range(0, len(text_to_image), 7):  # captions arrive in batches
        stop = start + 7
        metric.add_batch(predictions=scores.T[start:stop].tolist(), references=text_to_image[start:stop].tolist())
    assert metric.compute() == retrieval_metrics(scores, text_to_image)
    with pytest.raises(ValueError, match="lengths \\[1, 2\\]"):
        metric.compute(predictions=[[0.1, 0.2], [0.3]], references=[0, 1])


def test_speed_benchmark_quick_mode(tmp_path):
    """In this process (a fresh interpreter would spend far longer importing than the quick mode runs): a mismatch
    exits with SystemExit(1), which fails the test as the script's exit status would."""
    import torch
    from test_benchmarks_cusa import load_benchmark

    output = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        returned = load_benchmark("eval_speed").main(["--quick", "--json", str(output)])
    finally:
        torch.set_num_threads(threads)  # the benchmark times the fast path at 1 and 2 threads
    result = json.loads(output.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["shape"] == [100, 500]
    assert result["identical_metrics"] and result["identical_ranks_without_ties"]
    assert result["metrics_fast"]["rsum"] > 0
