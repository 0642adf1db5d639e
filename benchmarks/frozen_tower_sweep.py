"""Fast ablation of the built-in default's training settings on cached frozen-tower features (coco_mini).

With both towers frozen, a training step of the built-in student only runs the projections, CUSA's heads and losses.
This script builds the built-in student exactly as ``examples/run_cusa.py`` does (same towers, teachers, data split
and cached tower features), then trains it in a plain loop over the cached features: AdamW (weight decay on every
tensor except biases and 1-d ones, as ``CusaTrainer``), a cosine schedule without warm-up, temperature clamping
after every step, batches drawn by a seeded permutation. It evaluates validation and test retrieval after every
epoch, and reports the last epoch (what the default tests) and, for reference, the test score at the epoch with the
best validation RSUM. It does not use ``transformers.Trainer`` (no gradient clipping, its own shuffling), so its
numbers differ run by run from ``run_cusa.py``'s; it exists to compare settings quickly and on validation data.
The settings of the default were chosen on the validation columns of its output; test columns are reported, never
used to choose.

    python benchmarks/frozen_tower_sweep.py --variants '[{"num_train_epochs": 50, "tower_dropout": 0.5}]' --seeds 0 1 2

Each variant is a JSON object of ``learning_rate``, ``num_train_epochs``, ``per_device_train_batch_size``,
``weight_decay`` and any ``CusaConfig`` field; unspecified settings are the built-in default's. Every variant runs
the InfoNCE baseline and CUSA for each seed; results are appended to ``--output`` (JSON lines) and summarised.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

TRAINING_FIELDS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay")
#: Settings that only CUSA's terms read: the baseline of a variant that changes only these is the default's baseline.
CUSA_ONLY_FIELDS = (
    "csa_weight", "usa_weight", "softlabel_temperature", "softlabel_mode", "softlabel_loss", "csa_temperature",
    "usa_image_temperature", "usa_text_temperature",
)  # fmt: skip


def prepare(output_dir: str):
    """The built-in default's splits with teacher and frozen-tower columns, as tensors."""
    import run_cusa
    from transformers import set_seed

    from cusa_hf.arguments import parse_arguments
    from cusa_hf.data import load_splits
    from cusa_hf.evaluation.eval_view import build_eval_view
    from cusa_hf.example_data import default_training_data
    from cusa_hf.factory import build_model, build_processor, cache_frozen_towers
    from cusa_hf.schema import stable_image_id
    from cusa_hf.teachers.features import add_teacher_features

    model_args, data_args, training_args = parse_arguments(
        ["--output_dir", output_dir, "--disable_tqdm", "true"], default_config=run_cusa.BUILTIN_CONFIG
    )
    processor = build_processor(model_args)
    folder, _ = default_training_data(output_dir)
    data_args.train_file, data_args.test_file = str(folder / "train.json"), str(folder / "test.json")
    splits = load_splits(data_args)
    splits["train"] = add_teacher_features(
        splits["train"], image_teacher=data_args.image_teacher, text_teacher=data_args.text_teacher, show_progress=False
    )
    set_seed(0)
    model = build_model(model_args)
    splits = cache_frozen_towers(model, splits, processor, model_args, data_args, show_progress=False)
    train = splits["train"]

    def column(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(train.with_format("numpy", columns=[name])[name], dtype=np.float32))

    tensors = {
        "image_tower_features": column("image_tower_features"),
        "text_tower_features": column("text_tower_features"),
        "teacher_image_embeds": column("teacher_image_embeds"),
        "teacher_text_embeds": column("teacher_text_embeds"),
        "image_ids": torch.tensor([stable_image_id(value) for value in train["image_id"]]),
    }
    views = {name: build_eval_view(splits[name]) for name in ("validation", "test")}
    defaults = {name: getattr(training_args, name) for name in TRAINING_FIELDS}
    return model_args, training_args, defaults, tensors, views


@torch.no_grad()
def rsum(model, view) -> float:
    from cusa_hf.evaluation.metrics import retrieval_metrics

    model.eval()
    images = model.get_image_features(image_tower_features=view.image_tower_features)
    texts = model.get_text_features(text_tower_features=view.text_tower_features)
    model.train()
    return retrieval_metrics(images @ texts.T, view.text_to_image)["rsum"]


def train_one(context, variant: dict, cusa: bool, seed: int) -> dict:
    from transformers import get_scheduler, set_seed

    from cusa_hf.factory import build_model

    model_args, training_args, defaults, tensors, views = context
    settings = {**defaults, **{key: value for key, value in variant.items() if key in TRAINING_FIELDS}}
    fields = training_args.cusa_config_fields(cusa)
    fields.update({key: value for key, value in variant.items() if key not in TRAINING_FIELDS})
    if not cusa:
        fields.update(use_csa=False, use_usa=False)
    set_seed(seed)
    model = build_model(model_args, **fields)
    model.train()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in trainable if p.ndim != 1 and not name.endswith(".bias")]
    no_decay = [p for name, p in trainable if not (p.ndim != 1 and not name.endswith(".bias"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings["learning_rate"],
    )
    rows, batch = len(tensors["image_ids"]), settings["per_device_train_batch_size"]
    steps, epochs = math.ceil(rows / batch), int(settings["num_train_epochs"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(rows, generator=generator)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            inputs = {name: tensor[index] for name, tensor in tensors.items()}
            if not model.config.needs_teachers:
                inputs = {k: v for k, v in inputs.items() if not k.startswith("teacher_")}
            model(**inputs, return_loss=True).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            model.clamp_temperatures_()
        history.append((rsum(model, views["validation"]), rsum(model, views["test"])))
    best = max(range(epochs), key=lambda epoch: history[epoch][0])
    return {
        "validation_rsum": history[-1][0],
        "test_rsum": history[-1][1],
        "best_validation_epoch": best + 1,
        "test_rsum_at_best_validation": history[best][1],
        "history": history,
    }


def summarize(results: list[dict]) -> str:
    lines = [
        "| variant | seeds | InfoNCE val | CUSA val | InfoNCE test | CUSA test | CUSA - InfoNCE test (per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    variants = list(dict.fromkeys(json.dumps(r["variant"], sort_keys=True) for r in results))
    for key in variants:
        runs = {(r["cusa"], r["seed"]): r for r in results if json.dumps(r["variant"], sort_keys=True) == key}
        seeds = sorted({seed for cusa, seed in runs if (not cusa, seed) in runs})
        if not seeds:
            continue

        def mean(cusa: bool, metric: str) -> str:
            values = [runs[(cusa, seed)][metric] for seed in seeds]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            return f"{statistics.fmean(values):.1f}{spread}"

        differences = [runs[(True, s)]["test_rsum"] - runs[(False, s)]["test_rsum"] for s in seeds]
        lines.append(
            f"| `{key}` | {len(seeds)} | {mean(False, 'validation_rsum')} | {mean(True, 'validation_rsum')} | "
            f"{mean(False, 'test_rsum')} | {mean(True, 'test_rsum')} | {statistics.fmean(differences):+.1f} "
            f"({', '.join(f'{d:+.1f}' for d in differences)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="[{}]", help="JSON list of setting overrides (default: the default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default="outputs/frozen-tower-sweep/runs.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in output.read_text().splitlines()] if output.is_file() else []
    context = prepare(str(output.parent))
    for variant in json.loads(args.variants):
        for seed in args.seeds:
            for cusa in (False, True):
                if any(r["variant"] == variant and r["seed"] == seed and r["cusa"] == cusa for r in done):
                    continue
                start = time.time()
                baseline_of = {k: v for k, v in variant.items() if k not in CUSA_ONLY_FIELDS}
                same = [r for r in done if not cusa and not r["cusa"] and r["seed"] == seed and r["variant"] == baseline_of]
                if same:  # the baseline does not read this variant's settings: the same run, not run again
                    result = {**same[0], "variant": variant, "baseline_of": baseline_of}
                else:
                    result = {"variant": variant, "seed": seed, "cusa": cusa, **train_one(context, variant, cusa, seed)}
                result["seconds"] = round(time.time() - start, 1)
                done.append(result)
                with output.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    table = summarize([r for r in done if r["seed"] in args.seeds])
    print(table)
    return table


if __name__ == "__main__":
    main()
