"""The cost and gain benchmarks: their measuring helpers on hand-checked cases and their ``--quick`` runs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_cost = load_benchmark("step_cost")
cusa_gain = load_benchmark("cusa_gain")


@pytest.fixture(scope="module")
def quick_teacher_cache(tmp_path_factory) -> str:
    """One teacher-feature cache for the quick gain runs: they share the quick data, so the teachers run once."""
    return str(tmp_path_factory.mktemp("quick_teacher_cache"))


def test_peak_tensor_memory_counts_new_storages_until_freed():
    features = torch.randn(1024, 256)
    with step_cost.PeakTensorMemory() as tracker:
        similarity = features @ features.t()  # new 4 MiB; the transposed view of an input is not new memory
        probabilities = similarity.softmax(dim=1)  # another 4 MiB while both live
        del similarity
        assert tracker.live_bytes == 4 * 2**20
        probabilities.mul_(2)  # in place: no new memory
        del probabilities
    assert tracker.peak_bytes == 8 * 2**20
    assert tracker.live_bytes == 0


def test_same_label_map_hand_checked():
    # Rows 0 and 1 share a label; row 2 is alone (skipped as a query). Row 0's nearest is row 2, then row 1: AP 1/2.
    # Row 1's nearest is row 0: AP 1.
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.9, -0.1]])
    assert cusa_gain.same_label_map(features, ["a", "a", "b"]) == pytest.approx(100 * (0.5 + 1.0) / 2)


@pytest.mark.slow  # a minute or more on 2 shared CPU cores: tiny CLIP steps plus two fresh memory subprocesses
def test_step_cost_quick(tmp_path):
    report = step_cost.main(["--quick", "--json", str(tmp_path / "cost.json")])
    assert json.loads((tmp_path / "cost.json").read_text())["timing"] == report["timing"]
    timing = {(row["batch_size"], row["variant"]): row for row in report["timing"]}
    assert set(timing) == {(8, "infonce"), (8, "cusa"), (32, "infonce"), (32, "cusa")}
    for row in timing.values():
        assert row["steps"] == 3 and row["student"] == "tiny_clip"
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and math.isfinite(row["max_ms"])
        assert row["ratio_to_baseline"] == pytest.approx(row["median_ms"] / timing[(row["batch_size"], "infonce")]["median_ms"])
    memory = {row["variant"]: row for row in report["memory"]}
    assert set(memory) == {"infonce", "cusa"}
    # CUSA's step does the baseline's work plus USA heads, soft labels and KL terms: strictly more tensor memory.
    assert 0 < memory["infonce"]["step_peak_tensor_mib"] < memory["cusa"]["step_peak_tensor_mib"]
    assert "| tiny_clip | 32 | cusa |" in step_cost.markdown(report)


def test_step_cost_quick_times_the_sigmoid_term(tmp_path, monkeypatch):
    built = []
    original = step_cost.build_student

    def recording_build_student(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        built.append((model.config.itc_loss, model.config.use_csa))
        return model, tokenizer

    monkeypatch.setattr(step_cost, "build_student", recording_build_student)
    report = step_cost.main(["--quick", "--itc_loss", "sigmoid", "--parts", "timing"])
    assert report["itc_loss"] == "sigmoid" and report["memory"] == []
    assert built == [("sigmoid", False), ("sigmoid", True)]  # the baseline and CUSA, both with the sigmoid term
    assert [(row["batch_size"], row["variant"]) for row in report["timing"]] == [
        (8, "sigmoid"), (8, "cusa"), (32, "sigmoid"), (32, "cusa")
    ]
    baseline = {row["batch_size"]: row["median_ms"] for row in report["timing"] if row["variant"] == "sigmoid"}
    for row in report["timing"]:
        assert row["ratio_to_baseline"] == pytest.approx(row["median_ms"] / baseline[row["batch_size"]])
    assert "| tiny_clip | 32 | sigmoid |" in step_cost.markdown(report)


@pytest.mark.slow  # four tiny fine-tuning runs with the real pretrained student and teachers
def test_cusa_gain_quick(tmp_path, quick_teacher_cache):
    # One epoch per row instead of the default config's 50 (flags after "--" apply to every row): the rows, their
    # commands, summary and references are what is checked, not what 50 epochs learn.
    argv = ["--quick", "--output_dir", str(tmp_path), "--teacher_cache_dir", quick_teacher_cache, "--",
            "--num_train_epochs", "1"]
    summary = cusa_gain.main(argv)
    assert list(summary) == ["infonce", "csa", "usa", "cusa"]
    assert [entry["row"] for entry in summary.values()] == ["InfoNCE", "+CSA", "+USA", "CUSA"]
    for entry in summary.values():
        assert entry["n_seeds"] == 1 and entry["test_rsum_std"] == 0.0
        assert f"| {entry['row']} | 1 | {entry['test_i2t_r1']:.1f} |" in cusa_gain.markdown(summary, "test")
        recalls = [entry[f"test_{column}"] for column in cusa_gain.RETRIEVAL_COLUMNS[:-1]]
        assert all(0 <= value <= 100 for value in recalls)
        assert entry["test_rsum"] == pytest.approx(sum(recalls))
        for column in cusa_gain.UNIMODAL_COLUMNS:
            assert 0 <= entry[column] <= 100
    runs = json.loads((tmp_path / "gain_runs.json").read_text())
    assert set(runs) == {f"{row}/seed0" for row in cusa_gain.ROWS}
    assert "--use_csa false" in runs["usa/seed0"]["command"] and "--cusa false" in runs["infonce/seed0"]["command"]
    assert all(run["command"].endswith("--num_train_epochs 1") for run in runs.values())
    references = json.loads((tmp_path / "text_text_references.json").read_text())
    assert set(references) == {"offline:all-mpnet-base-v2", "offline:all-MiniLM-L6-v2"}
    assert all(0 <= value <= 100 for reference in references.values() for value in reference.values())
    # A rerun finds every run finished and only summarises.
    assert cusa_gain.main(argv) == summary


@pytest.mark.slow  # a one-step stage 1, then two one-step fine-tuning runs with the real pretrained student
def test_finetune_ablation_quick(tmp_path):
    import sys

    sys.path.insert(0, str(BENCHMARKS.parent / "examples"))
    import run_cusa

    finetune_ablation = load_benchmark("finetune_ablation")
    _, data_flags = cusa_gain.quick_data(tmp_path / "stage1-data")
    stage1 = tmp_path / "stage1"
    run_cusa.main([str(run_cusa.BUILTIN_CONFIG), *data_flags, "--cusa", "false", "--compare_with_baseline", "false",
                   "--max_steps", "1", "--output_dir", str(stage1), "--text_teacher", "offline:all-MiniLM-L6-v2",
                   "--disable_tqdm", "true"])  # fmt: skip
    output_dir = tmp_path / "ablation"
    variants = '{"infonce": ["--cusa", "false"], "cusa-headlr": ["--learning_rate_mapping", "{\\"usa_\\": 0.001}"]}'
    argv = ["--quick", "--stage1", str(stage1), "--output_dir", str(output_dir), "--variants", variants, "--seeds", "0"]
    table = finetune_ablation.main(argv)

    runs = {run["variant"]: run for run in map(json.loads, (output_dir / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"infonce", "cusa-headlr"}
    for run in runs.values():
        assert run["seed"] == 0 and f"--backbone {stage1}" in run["command"]
        assert run["test_rsum"] == pytest.approx(sum(run[f"test_{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
        assert 0 <= run["tt_map_uni"] <= 100
    # Stage 1 was trained without USA: the InfoNCE run keeps no heads; the CUSA run trains fresh ones.
    assert "usa_head_norm" not in runs["infonce"] and runs["cusa-headlr"]["usa_head_norm"] > 0
    assert runs["infonce"]["loss_csa"] == 0 and runs["cusa-headlr"]["loss_csa"] > 0
    gain = runs["cusa-headlr"]["test_rsum"] - runs["infonce"]["test_rsum"]
    assert f"| cusa-headlr | 1 | {runs['cusa-headlr']['validation_rsum']:.1f} |" in table
    assert f"({gain:+.1f})" in table
    assert (output_dir / "summary.md").read_text() == table + "\n"
    # A rerun finds both runs finished and only summarises, also against references of each variant's own.
    assert finetune_ablation.main(argv) == table
    swapped = finetune_ablation.main([*argv, "--reference", '{"infonce": "cusa-headlr", "cusa-headlr": "cusa-headlr"}'])
    def variant_row(text, name):
        return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))

    swapped_gain = runs["infonce"]["test_rsum"] - runs["cusa-headlr"]["test_rsum"]
    assert "| - | - |" in variant_row(table, "infonce")
    assert f"({swapped_gain:+.1f})" in variant_row(swapped, "infonce")  # now a gain over the CUSA run
    assert "| - | - |" in variant_row(swapped, "cusa-headlr")  # its own reference: no gain
    # The temperatures each run ended at: InfoNCE's for both, CSA's and USA's only where CUSA trained them.
    cusa_row = variant_row(table, "cusa-headlr")
    for name in ("itc_temperature", "csa_temperature", "usa_image_temperature", "usa_text_temperature"):
        assert f"{runs['cusa-headlr'][name]:.3f}" in cusa_row
    assert f"| {runs['infonce']['itc_temperature']:.3f} | - | - |" in variant_row(table, "infonce")


@pytest.mark.slow  # two tiny fine-tuning runs of the built-in student (frozen, cached towers) with the sigmoid term
def test_cusa_gain_quick_with_the_sigmoid_term(tmp_path, quick_teacher_cache):
    summary = cusa_gain.main(["--quick", "--itc_loss", "sigmoid", "--rows", "infonce", "cusa", "--references",
                              "--output_dir", str(tmp_path), "--teacher_cache_dir", quick_teacher_cache,
                              "--", "--num_train_epochs", "1"])  # fmt: skip
    assert [entry["row"] for entry in summary.values()] == ["sigmoid", "CUSA"]
    runs = json.loads((tmp_path / "gain_runs.json").read_text())
    assert all("--itc_loss sigmoid" in run["command"] and run["command"].endswith("--num_train_epochs 1")
               for run in runs.values())
    for row in ("infonce", "cusa"):
        config = json.loads((tmp_path / f"{row}-seed0" / "config.json").read_text())
        assert config["itc_loss"] == "sigmoid" and config["use_csa"] == (row == "cusa")
        assert 0 <= summary[row]["test_rsum"] <= 600
