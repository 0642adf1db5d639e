"""Fine-tuning an aligned model with CUSA: the ablation behind ``examples/configs/builtin_finetune.yaml``.

Every run is ``examples/run_cusa.py examples/configs/builtin_finetune.yaml --backbone <stage 1>`` with one variant's
flags on top, one run per variant and seed (``--compare_with_baseline false``), starting from the same stage-1
checkpoint (by default the built-in default's InfoNCE baseline). Settings are compared on the validation images;
the test split is reported beside them, never used to choose.

For each run it records the validation and test retrieval metrics, the last logged training terms (``loss_itc``,
``loss_csa``, ``loss_usa``), the soft labels' row entropy, the temperatures (from the run's ``trainer_state.json``),
the Frobenius norm of the USA heads' weights, and same-image caption retrieval on the test split (mAP with the USA
head and with the retrieval embedding; ``benchmarks/cusa_gain.py`` explains the measure), and its wall time (the
run and these measures, so it depends on the machine's load).

Runs are appended to ``<output_dir>/runs.jsonl`` (a rerun skips finished ones); the summary (mean ± sample std over
seeds, and each variant's gain over the ``--reference`` variant of the same seed) is printed as Markdown and written
to ``<output_dir>/summary.md``.

    python benchmarks/finetune_ablation.py --variants '{"infonce": ["--cusa", "false"], "cusa": []}' --seeds 0 1 2
    python benchmarks/finetune_ablation.py --variants variants.json --reference infonce
    python benchmarks/finetune_ablation.py --variants variants.json --reference '{"cusa-fresh": "infonce-fresh"}'
    python benchmarks/finetune_ablation.py --quick        # a few images, one seed, one step each (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

FINETUNE_CONFIG = REPO / "examples" / "configs" / "builtin_finetune.yaml"
#: Logged training values reported per run: the mean over the last ``TAIL_LOGS`` logging steps.
LOGGED = ("loss_itc", "loss_csa", "loss_usa", "softlabel_entropy_image", "softlabel_entropy_text", "itc_temperature",
          "csa_temperature", "usa_image_temperature", "usa_text_temperature")  # fmt: skip
TAIL_LOGS = 3
SUMMARY_COLUMNS = ("validation_rsum", "test_rsum", "tt_map_uni", "tt_map_cross", "loss_itc", "loss_csa", "loss_usa",
                   "softlabel_entropy_image", "itc_temperature", "csa_temperature", "usa_image_temperature",
                   "usa_text_temperature", "usa_head_norm", "wall_s")  # fmt: skip


def logged_values(run_dir: Path) -> dict[str, float]:
    """The mean of the last logged values of each training term in ``trainer_state.json``."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    values = {}
    for name in LOGGED:
        tail = [entry[name] for entry in logs if name in entry][-TAIL_LOGS:]
        if tail:
            values[name] = statistics.fmean(tail)
    return values


def head_norm(run_dir: Path) -> dict[str, float]:
    from cusa_hf import CusaModel

    model = CusaModel.from_pretrained(run_dir)
    if not model.config.use_usa:
        return {}
    norms = [getattr(model, head).linear.weight.norm().item() for head in ("usa_image_head", "usa_text_head")]
    return {"usa_head_norm": statistics.fmean(norms)}


def run_one(name: str, flags: list[str], seed: int, args: argparse.Namespace) -> dict:
    import run_cusa
    from cusa_gain import text_text_retrieval

    from cusa_hf.example_data import coco_mini_folder

    run_dir = Path(args.output_dir) / f"{name}-seed{seed}"
    argv = [str(FINETUNE_CONFIG), "--backbone", args.stage1, "--compare_with_baseline", "false", "--seed", str(seed),
            "--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--disable_tqdm", "true",
            *(["--teacher_cache_dir", args.teacher_cache_dir] if args.teacher_cache_dir else []),
            *args.data_flags, *flags]  # fmt: skip
    start = time.time()
    metrics = next(iter(run_cusa.main(argv).values()))
    data = dict(zip(args.data_flags[::2], args.data_flags[1::2]))  # the quick mode's flag/value pairs
    test_file = data.get("--test_file", str(coco_mini_folder() / "test.json"))
    metrics.update(text_text_retrieval(str(run_dir), test_file, data.get("--image_root")))
    metrics.update(logged_values(run_dir))
    metrics.update(head_norm(run_dir))
    metrics["wall_s"] = round(time.time() - start, 1)
    metrics["command"] = "python examples/run_cusa.py " + shlex.join([os.path.relpath(argv[0], REPO), *argv[1:]])
    return metrics


def summarize(runs: list[dict], variants: list[str], references: dict[str, str]) -> str:
    """Markdown: per variant, mean ± std over seeds of each column, and the test / validation gain over its
    reference variant (``references[variant]``) of the same seed (with the per-seed test gains)."""
    by_key = {(run["variant"], run["seed"]): run for run in runs}

    def cell(values: list[float], digits: int = 1) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    header = ["variant", "seeds", "val RSUM", "test RSUM", "val gain", "test gain (per seed)", "tt mAP uni",
              "tt mAP cross", "loss_itc", "loss_csa", "loss_usa", "soft-label entropy", "τ_itc end", "τ_c end",
              "τ_u end (image / text)", "USA head norm", "run s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        seeds = sorted(seed for (name, seed) in by_key if name == variant)
        if not seeds:
            continue
        rows = [by_key[(variant, seed)] for seed in seeds]
        column = {name: [row[name] for row in rows if name in row] for name in SUMMARY_COLUMNS}
        gains = {"validation_rsum": [], "test_rsum": []}
        reference = references.get(variant)
        if reference is not None and variant != reference:
            for seed, row in zip(seeds, rows):
                if (reference, seed) in by_key:
                    for name in gains:
                        gains[name].append(row[name] - by_key[(reference, seed)][name])
        per_seed = ", ".join(f"{gain:+.1f}" for gain in gains["test_rsum"])
        usa_temperatures = (f"{cell(column['usa_image_temperature'], 3)} / {cell(column['usa_text_temperature'], 3)}"
                            if column["usa_image_temperature"] else "-")  # fmt: skip
        lines.append("| " + " | ".join([
            variant, str(len(seeds)), cell(column["validation_rsum"]), cell(column["test_rsum"]),
            cell(gains["validation_rsum"]), f"{cell(gains['test_rsum'])} ({per_seed})" if per_seed else "-",
            cell(column["tt_map_uni"]), cell(column["tt_map_cross"]), cell(column["loss_itc"], 4),
            cell(column["loss_csa"], 3), cell(column["loss_usa"], 3), cell(column["softlabel_entropy_image"], 2),
            cell(column["itc_temperature"], 3), cell(column["csa_temperature"], 3),
            usa_temperatures, cell(column["usa_head_norm"], 1), cell(column["wall_s"], 0),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default='{"infonce": ["--cusa", "false"], "cusa": ["--cusa", "true"]}',
                        help="JSON (or a JSON file) mapping variant names to run_cusa flags")
    parser.add_argument("--reference", default="infonce",
                        help="the variant that gains are measured against, or JSON mapping variants to their own "
                        "reference (variants it leaves out use 'infonce')")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stage1", default="outputs/cusa-default/baseline", help="the checkpoint both runs start from")
    parser.add_argument("--output_dir", default="outputs/finetune-ablation")
    parser.add_argument("--teacher_cache_dir", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny data, one step per run (what the tests run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = json.loads(Path(args.variants).read_text() if args.variants.endswith(".json") else args.variants)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args.data_flags = []
    if args.quick:
        from cusa_gain import quick_data

        _, args.data_flags = quick_data(output_dir / "quick-data")
        args.data_flags += ["--max_steps", "1", "--text_teacher", "offline:all-MiniLM-L6-v2"]
    runs_file = output_dir / "runs.jsonl"
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []
    done = {(run["variant"], run["seed"]) for run in runs}
    for seed in args.seeds:
        for name, flags in variants.items():
            if (name, seed) in done:
                continue
            metrics = run_one(name, flags, seed, args)
            run = {"variant": name, "seed": seed, "flags": flags, **metrics}
            runs.append(run)
            with runs_file.open("a") as handle:
                handle.write(json.dumps(run) + "\n")
            print(f"{name} seed {seed}: validation RSUM {run['validation_rsum']:.2f}, test RSUM {run['test_rsum']:.2f}",
                  flush=True)  # fmt: skip
    references = json.loads(args.reference) if args.reference.startswith("{") else {}
    default_reference = "infonce" if references else args.reference
    table = summarize(runs, list(variants), {name: references.get(name, default_reference) for name in variants})
    (output_dir / "summary.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
