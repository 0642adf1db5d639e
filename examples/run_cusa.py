#!/usr/bin/env python
"""Fine-tune an image-text retrieval model with CUSA: train, select on validation RSUM, test once, save, push.

    accelerate launch examples/run_cusa.py              # built-in offline default (on CPU: every core, logged)
    accelerate launch examples/run_cusa.py examples/configs/clip_vitb32_coco_cusa.yaml --num_train_epochs 5
    python examples/run_cusa.py --backbone openai/clip-vit-base-patch32 --train_file train.json \
        --validation_file val.json --test_file test.json --output_dir out --cusa false
    accelerate launch examples/run_cusa.py examples/configs/sgr_coco_mini_grid.yaml    # SGR on region features

Settings come from three dataclasses (``cusa_hf.arguments``: model, data, ``CusaTrainingArguments``), from a
YAML/JSON file given as the first argument, or both (flags override the file). Without a config file and without
``--backbone`` the script starts from ``examples/configs/builtin_default.yaml``: a dual encoder of frozen pretrained
EfficientNet-Lite0 + MiniLM towers trained on coco_mini (else the CUSA authors' example data, fetched once; offline,
generated shapes) as the baseline (its contrastive term alone: InfoNCE, or ``--itc_loss sigmoid``) and with CUSA, on
CPU. ``--backbone sgraf`` (or a saved SGR/SAF folder) trains on precomputed region features (``--features_dir``) and
tests under ``--eval_protocol`` (docs/sgraf.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from transformers import set_seed

from cusa_hf.arguments import CusaTrainingArguments, DataArguments, ModelArguments, parse_arguments
from cusa_hf.backbone_recipes import RunData, backbone_recipe
from cusa_hf.backbones import rerank_factory
from cusa_hf.cpu_threads import use_every_cpu_core
from cusa_hf.streaming import load_training_stream
from cusa_hf.evaluation.evaluator import RetrievalEvaluator
from cusa_hf.evaluation.metrics import format_retrieval_table
from cusa_hf.factory import build_model, cache_frozen_towers
from cusa_hf.model_card import CusaModelCardData, comparison_hub_model_id
from cusa_hf.optimization import unmatched_patterns
from cusa_hf.teachers.features import reuse_or_add_teacher_features
from cusa_hf.checkpoints import RESUME_LATEST, claim_output_dir, last_complete_checkpoint
from cusa_hf.trainer import CusaTrainer

logger = logging.getLogger("run_cusa")
BUILTIN_CONFIG = Path(__file__).resolve().parent / "configs" / "builtin_default.yaml"


@dataclasses.dataclass
class Run:
    """What every trained model of a run shares: its settings, its backbone's data and the command that started it."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: CusaTrainingArguments
    data: RunData
    command: str


def train_one(name: str, cusa_on: bool, run: Run) -> dict[str, float]:
    """Train one model (CUSA when ``cusa_on``, else the baseline: the contrastive term alone), evaluate it on validation and test, save it
    with its model card and push it; returns its metrics."""
    model_args, data_args, training_args, splits = run.model_args, run.data_args, run.training_args, run.data.splits
    processor = run.data.processor
    # 5a. The model: the backbone wrapped with CUSA's heads, towers frozen (and their outputs cached) as asked.
    set_seed(training_args.seed)
    model = build_model(model_args, run.data, **training_args.cusa_config_fields(cusa_on))
    if model_args.cache_frozen_towers:
        splits = cache_frozen_towers(model, splits, processor, model_args, data_args, not training_args.disable_tqdm)
    run_args = dataclasses.replace(training_args)
    if not cusa_on and run_args.learning_rate_mapping:
        # The baseline has no USA heads and no CSA temperature: patterns naming only those apply to CUSA runs.
        unused = unmatched_patterns(model, run_args.learning_rate_mapping)
        if unused:
            kept = {pattern: rate for pattern, rate in run_args.learning_rate_mapping.items() if pattern not in unused}
            run_args.learning_rate_mapping = kept or None
            logger.warning("learning_rate_mapping pattern(s) %s match no trainable parameter of the baseline model "
                           "(no USA heads or CSA temperature): they apply to the CUSA run only", unused)  # fmt: skip
    if name != "single":  # each run of a comparison has its own folder and Hub repo (me/x and me/x-baseline)
        run_args.output_dir, run_args.run_name = os.path.join(training_args.output_dir, name), name
        run_args.hub_model_id = comparison_hub_model_id(training_args.hub_model_id, training_args.output_dir, name)

    # 5b. Train, selecting on the validation split's RSUM when the arguments ask for it.
    evaluator = None
    if "validation" in splits:
        evaluator = RetrievalEvaluator(
            splits["validation"],
            batch_size=run_args.per_device_eval_batch_size,
            text_batch_size=max(run_args.per_device_eval_batch_size, 64),
            rerank=rerank_factory(model, k_test=model_args.rerank_k_test) if model_args.rerank else None,
            image_root=data_args.image_root,
            max_length=data_args.max_text_length,
            show_progress=not run_args.disable_tqdm,
            **run.data.evaluator_settings,
        )
    trainer = CusaTrainer(
        model=model,
        args=run_args,
        train_dataset=splits["train"],
        processing_class=processor,
        data_collator=run.data.collator,
        collator_kwargs={"image_root": data_args.image_root, "max_length": data_args.max_text_length},
        evaluator=evaluator,
        model_card_data=CusaModelCardData(
            backbone=model_args.backbone, training_data=run.data.description, command=run.command, data_args=data_args,
            fresh_heads=model_args.fresh_heads,
        ),
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(run_args.output_dir) if resume in RESUME_LATEST else resume)
    trainer.save_state()  # trainer_state.json: the logged CUSA terms, soft-label statistics and temperatures

    # 6. Evaluate: validation (the split the run was selected on) and the test split, once.
    metrics = trainer.evaluate(metric_key_prefix="validation") if evaluator is not None else {}
    if "test" in splits:
        metrics.update(run.data.test_metrics(trainer, splits["test"]))

    # 7. Save the model with its processor and model card (the validation and test metrics logged above); push_to_hub
    #    saves them and uploads the folder.
    if run_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"CUSA run {name}")
    else:
        trainer.save_model()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    command = "accelerate launch examples/run_cusa.py " + shlex.join(argv)

    # 1. Settings: a config file (the built-in default without one), then flags; CUSA settings validated now.
    model_args, data_args, training_args = parse_arguments(argv, default_config=BUILTIN_CONFIG)
    use_every_cpu_core(training_args.device, training_args.world_size)  # a bare accelerate launch gives one thread
    #    The output folder is claimed (writable, locked against other runs, no earlier run replaced) until the end.
    lock = None
    if training_args.process_index == 0:
        lock = claim_output_dir(
            training_args.output_dir,
            training_args.overwrite_output_dir,
            training_args.resume_from_checkpoint,
            inputs=run_inputs(model_args, data_args),
        )
    try:
        return run_steps(model_args, data_args, training_args, command)
    finally:
        if lock is not None:
            lock.release()


def run_inputs(model_args, data_args) -> dict[str, str | None]:
    """What the run reads (backbone, processor, data), by flag: none may lie inside the output folder it writes."""
    names = ("backbone", "processor_name", "sgraf_vocab_file")
    inputs = {name: getattr(model_args, name) for name in names}
    for name in ("train_file", "validation_file", "test_file", "image_root", "features_dir"):
        inputs[name] = getattr(data_args, name)
    return inputs


def run_steps(model_args, data_args, training_args, command) -> dict[str, dict[str, float]]:
    """Steps 2 to 8 of :func:`main`, in the output folder it claimed."""

    # 2. Data: what the backbone's recipe reads (image-caption splits, the built-in data by default; region features
    #    for SGR/SAF) and its processor.
    data = backbone_recipe(model_args.backbone).load_run_data(model_args, data_args, training_args)
    splits = data.splits

    # 3. Teacher features, computed once per image and caption (cached; reused when the data already has them).
    if training_args.needs_teachers:
        splits["train"] = reuse_or_add_teacher_features(
            splits["train"],
            image_column=data.teacher_image_column,
            image_teacher=data_args.image_teacher,
            text_teacher=data_args.text_teacher,
            batch_size=data_args.teacher_batch_size,
            image_root=data_args.image_root,
            cache_dir=data_args.teacher_cache_dir,
        )
    if data_args.streaming:  # the trainer reads the training split as a stream, features joined from the tables
        splits["train"] = load_training_stream(data_args, splits["train"], seed=training_args.seed)

    # 4-7. Train, evaluate and save each run: the baseline and CUSA with identical settings, or the one asked for.
    runs = [("baseline", False), ("cusa", True)] if training_args.compare_with_baseline else [("single", training_args.cusa)]
    results = {}
    run = Run(model_args, data_args, training_args, data, command)
    for name, cusa_on in runs:
        label = name if name != "single" else ("cusa" if cusa_on else "baseline")
        results[label] = train_one(name, cusa_on, run)

    # 8. Report both runs side by side.
    if training_args.process_index == 0:
        prefix = "test" if "test" in splits else "validation"
        print(f"\n{prefix} retrieval (R@K in %, RSUM = sum of the six; i2t uses all captions of an image)")
        print(format_retrieval_table(results, prefix))
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
