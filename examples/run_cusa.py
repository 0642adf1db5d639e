#!/usr/bin/env python
"""Fine-tune an image-text retrieval model with CUSA: train, select on validation RSUM, test once, save, push.

    accelerate launch --cpu --num_processes 1 examples/run_cusa.py              # built-in offline default, all cores
    accelerate launch examples/run_cusa.py examples/configs/clip_vitb32_coco_cusa.yaml --num_train_epochs 5
    python examples/run_cusa.py --backbone openai/clip-vit-base-patch32 --train_file train.json \
        --validation_file val.json --test_file test.json --output_dir out --cusa false
    accelerate launch examples/run_cusa.py examples/configs/sgr_coco_mini_grid.yaml    # SGR on region features

Arguments come from four dataclasses (model, data, CUSA, ``TrainingArguments``), from a YAML/JSON file given as
the first argument, or both (command-line flags override the file). Without a config file and without
``--backbone`` the script starts from ``examples/configs/builtin_default.yaml`` (flags still override it): a dual
encoder of frozen pretrained EfficientNet-Lite0 + MiniLM towers trained on coco_mini (else the CUSA authors' example
data, fetched once; offline, generated shapes) as the InfoNCE baseline and with CUSA, on CPU.

``--backbone sgraf`` (or a saved/converted SGR/SAF folder) takes its own data path: precomputed region features in
the SCAN format (``--features_dir``), a word-level ``SgrafTokenizer``, pairwise scoring for evaluation, and the test
split scored under ``--eval_protocol`` (docs/sgraf.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments, set_seed

from cusa_hf import CusaConfig, CusaModel, add_image_tower_features, add_text_tower_features, freeze_tower
from cusa_hf.data import hold_out_images, load_retrieval_dataset
from cusa_hf.example_data import LICENCE, ExampleDataUnavailable, fetch_example_data
from cusa_hf.model_card import write_model_card
from cusa_hf.models.sgraf import SgrafConfig, SgrafModel
from cusa_hf.models.sgraf.evaluation import PROTOCOLS, evaluate_sgraf
from cusa_hf.models.sgraf.training_data import SgrafTrainingData, load_sgraf_training_data, with_image_paths
from cusa_hf.teachers import reuse_or_add_teacher_features
from cusa_hf.trainer import CusaTrainer, claim_output_dir, last_complete_checkpoint

logger = logging.getLogger("run_cusa")
EXAMPLES = Path(__file__).resolve().parent
BUILTIN_BACKBONE = "builtin:efficientnet-lite0+minilm"
BUILTIN_CONFIG = EXAMPLES / "configs" / "builtin_default.yaml"
SGRAF_BACKBONE = "sgraf"
SGRAF_DEFAULTS = SgrafConfig()
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    backbone: str = field(
        default=BUILTIN_BACKBONE,
        metadata={
            "help": "Backbone to fine-tune: a Hub name or local folder of a CLIP / VisionTextDualEncoder / X2VLM / BLIP "
            f"model, or {BUILTIN_BACKBONE!r} (pretrained EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower "
            "installed from PyPI, new projections)."
        },
    )
    processor_name: str | None = field(default=None, metadata={"help": "Processor name/path (defaults to --backbone)."})
    projection_dim: int = field(default=256, metadata={"help": "Projection width of the built-in dual encoder."})
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Freeze the image tower (weights and BatchNorm statistics); CPU-friendly."}
    )
    freeze_text_tower: bool = field(
        default=False, metadata={"help": "Freeze the text tower (weights; dropout off, so training computes as evaluation)."}
    )
    cache_frozen_towers: bool = field(
        default=True,
        metadata={
            "help": "With --freeze_vision_tower / --freeze_text_tower on a CLIP / dual-encoder backbone: run each frozen "
            "tower once per image / caption of every split and train and evaluate on its cached output (the same "
            "model, without the tower's cost at every step)."
        },
    )
    rerank: bool = field(
        default=False,
        metadata={"help": "Evaluate fusion backbones (X2VLM, BLIP) by ITM reranking of the ITC top-k, as their papers do."},
    )
    rerank_k_test: int = field(default=256, metadata={"help": "Candidates reranked per query (256 COCO, 128 Flickr30K)."})
    sgraf_module_name: str = field(
        default=SGRAF_DEFAULTS.module_name,
        metadata={"help": f"With --backbone {SGRAF_BACKBONE}: the similarity reasoner, SGR or SAF (SgrafConfig.module_name)."},
    )
    sgraf_img_dim: int = field(
        default=SGRAF_DEFAULTS.img_dim,
        metadata={"help": "With --backbone sgraf: width of one region feature (2048 BUTD, 1280 EfficientNet-Lite grids)."},
    )
    sgraf_embed_size: int = field(
        default=SGRAF_DEFAULTS.embed_size, metadata={"help": "With --backbone sgraf: joint embedding size (SgrafConfig.embed_size)."}
    )
    sgraf_word_dim: int = field(
        default=SGRAF_DEFAULTS.word_dim, metadata={"help": "With --backbone sgraf: word embedding size (SgrafConfig.word_dim)."}
    )
    sgraf_sim_dim: int = field(
        default=SGRAF_DEFAULTS.sim_dim, metadata={"help": "With --backbone sgraf: similarity vector size (SgrafConfig.sim_dim)."}
    )
    sgraf_vocab_file: str | None = field(
        default=None,
        metadata={
            "help": "SGRAF vocabulary JSON (the original vocab/*_precomp_vocab.json or {word: id}). Default: the "
            "backbone folder's vocab.json, or, for a fresh --backbone sgraf, one built from the training captions "
            "(words seen at least 4 times) and written to --output_dir."
        },
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: authors'/ALBEF JSON, save_to_disk folder, imagefolder or Hub name."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation data (model selection only)."})
    test_file: str | None = field(default=None, metadata={"help": "Test data, evaluated once at the end."})
    train_split: str = field(default="train", metadata={"help": "Split name for Hub / DatasetDict sources."})
    validation_split: str = field(default="validation", metadata={"help": "Validation split name for Hub sources."})
    test_split: str = field(default="test", metadata={"help": "Test split name for Hub sources."})
    image_root: str | None = field(default=None, metadata={"help": "Folder that relative image paths resolve against."})
    validation_images: int = field(
        default=0, metadata={"help": "Without a validation file, hold out this many training images (all their captions)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (and report) records with empty captions or missing images."})
    image_teacher: str = field(
        default="offline:efficientnet-lite2",
        metadata={"help": "Image teacher: transformers/timm name or path, or offline:efficientnet-lite{0,1,2}."},
    )
    text_teacher: str = field(
        default="offline:all-mpnet-base-v2",
        metadata={"help": "Text teacher: sentence-transformers name or path, or offline:all-mpnet-base-v2 / offline:all-MiniLM-L6-v2."},
    )
    teacher_batch_size: int = field(default=64, metadata={"help": "Batch size of the teacher forward passes."})
    teacher_cache_dir: str | None = field(default=None, metadata={"help": "Where cached teacher features are kept."})
    max_text_length: int | None = field(default=None, metadata={"help": "Truncate captions to this many tokens."})
    features_dir: str | None = field(
        default=None,
        metadata={
            "help": "SGRAF backbones only: folder of SCAN-format region features ({split}_ims.npy, {split}_caps.txt, "
            "optional {split}_image_ids.txt / {split}_text_to_image.txt) for the train/validation/test splits."
        },
    )
    eval_protocol: str = field(
        default="coco5k",
        metadata={
            "help": f"SGRAF backbones only: test-set protocol, one of {sorted(PROTOCOLS)} (coco5k/f30k: one matrix over "
            "the split; coco1k: mean over 5 folds of 1,000 images). Validation always uses one matrix."
        },
    )


#: CusaConfig fields exposed on the command line (their defaults and types come from CusaConfig itself).
CUSA_FLAGS = (
    "csa_weight", "usa_weight", "use_csa", "use_usa", "itc_temperature", "csa_temperature", "usa_image_temperature",
    "usa_text_temperature", "learnable_temperatures", "softlabel_temperature", "softlabel_mode", "softlabel_loss",
    "itc_reduction", "cross_projection", "gather_features", "tower_dropout",
)  # fmt: skip


def _cusa_arguments_class():
    config_fields = {f.name: f for f in dataclasses.fields(CusaConfig)}
    specs = [
        ("cusa", bool, field(default=True, metadata={"help": "Train with CUSA; false trains the InfoNCE baseline."})),
        (
            "compare_with_baseline",
            bool,
            field(default=False, metadata={"help": "Also train the baseline with identical settings and print both."}),
        ),
        (
            "overwrite_output_dir",
            bool,
            field(default=False, metadata={"help": "Replace an earlier run in --output_dir (deleted first)."}),
        ),
    ]
    for name in CUSA_FLAGS:
        spec = config_fields[name]
        specs.append((name, spec.type, field(default=spec.default, metadata={"help": f"CusaConfig.{name}"})))
    return dataclasses.make_dataclass("CusaArguments", specs)


CusaArguments = _cusa_arguments_class()


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, CusaArguments, TrainingArguments))
    # Abbreviated flags (--backb) would slip past _backbone_flag and pick up the built-in default's settings.
    parser.allow_abbrev = False
    if not (argv and argv[0].endswith(CONFIG_SUFFIXES)) and _backbone_flag(argv) in (None, BUILTIN_BACKBONE):
        # The built-in backbone comes with its settings (epochs, batch, teachers, frozen towers): flags refine them.
        if argv:
            logger.warning(
                "no config file and no --backbone: starting from %s (built-in frozen towers, its schedule and offline "
                "teachers); the flags given override its values", BUILTIN_CONFIG.relative_to(EXAMPLES.parent)
            )
        argv = [str(BUILTIN_CONFIG), *argv]
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_path, argv = Path(argv[0]), argv[1:]
        if not config_path.is_file():
            raise FileNotFoundError(f"config file {config_path} does not exist")
        text = config_path.read_text()
        values = json.loads(text) if config_path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise ValueError(
                f"{config_path}: expected a mapping of setting names to values, got {type(values).__name__} "
                f"{'(the file is empty)' if values is None else ''}".rstrip()
            )
        known = {f.name for dataclass_type in parser.dataclass_types for f in dataclasses.fields(dataclass_type)}
        for key in values:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(
                    f"{config_path}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
        parser.set_defaults(**values)
    if not any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in argv) and parser.get_default(
        "output_dir"
    ) is None:
        parser.set_defaults(output_dir="outputs/cusa")
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _backbone_flag(argv: list[str]) -> str | None:
    """The value of ``--backbone`` on a command line, or ``None`` when it is not given."""
    for position, arg in enumerate(argv):
        if arg == "--backbone" and position + 1 < len(argv):
            return argv[position + 1]
        if arg.startswith("--backbone="):
            return arg.split("=", 1)[1]
    return None


def default_data_folder() -> Path | None:
    """coco_mini when it is there: ``$CUSA_COCO_MINI`` or ``../shared/data/coco_mini`` beside the repository."""
    candidate = Path(os.environ.get("CUSA_COCO_MINI", EXAMPLES.parent.parent / "shared" / "data" / "coco_mini"))
    return candidate if (candidate / "train.json").is_file() else None


def resolve_default_data(data_args: DataArguments, output_dir: str) -> str:
    """Fill in the built-in default data: coco_mini, else the CUSA authors' example data (fetched once into the
    cache), else (offline) a generated coloured-shapes set; returns its description."""
    if data_args.train_file is not None:
        return data_args.train_file
    folder = default_data_folder()
    if folder is not None:
        description = f"coco_mini ({folder}): 600 train / 201 test MS-COCO images, 5 captions each"
    else:
        try:
            folder = fetch_example_data()
            description = f"the CUSA authors' example MS-COCO data ({folder}; {LICENCE})"
        except ExampleDataUnavailable as error:
            from synthetic_data import write_shapes_dataset

            folder = write_shapes_dataset(Path(output_dir) / "generated_shapes")
            description = f"generated coloured-shapes data ({folder}); no real images could be had"
            logger.warning(
                "coco_mini was not found and the CUSA example data could not be fetched (%s): training on GENERATED "
                "coloured shapes instead. The numbers this run prints say nothing about real image-text retrieval; "
                "set CUSA_COCO_MINI or pass --train_file/--test_file for real data", error,
            )  # fmt: skip
    data_args.train_file = str(folder / "train.json")
    data_args.test_file = data_args.test_file or str(folder / "test.json")
    return description


def load_splits(data_args: DataArguments) -> dict[str, Any]:
    def load(source: str, split: str):
        dataset = load_retrieval_dataset(source, split=split, image_root=data_args.image_root, skip_invalid=data_args.skip_invalid)
        if len(dataset) == 0:
            raise ValueError(f"the {split} data from {source} is empty")
        return dataset

    train = load(data_args.train_file, data_args.train_split)
    splits = {"train": train}
    if data_args.validation_file:
        splits["validation"] = load(data_args.validation_file, data_args.validation_split)
    elif data_args.validation_images > 0:
        splits["train"], splits["validation"] = hold_out_images(train, data_args.validation_images)
    if data_args.test_file:
        splits["test"] = load(data_args.test_file, data_args.test_split)
    if data_args.max_train_samples is not None:
        if data_args.max_train_samples < 1:
            raise ValueError(f"max_train_samples={data_args.max_train_samples} leaves the training set empty")
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    return splits


def load_sgraf_data(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> SgrafTrainingData:
    """The region-feature datasets, tokenizer, collator and scorers of an SGR/SAF run (docs/sgraf.md)."""
    if data_args.features_dir is None:
        raise ValueError(f"--backbone {model_args.backbone} (SGRAF) reads precomputed region features: pass --features_dir")
    if model_args.freeze_vision_tower or model_args.freeze_text_tower:
        raise ValueError("--freeze_vision_tower / --freeze_text_tower apply to dual encoders, not to SGRAF backbones")
    fresh = model_args.backbone == SGRAF_BACKBONE
    return load_sgraf_training_data(
        data_args.features_dir,
        training_args,
        saved_model=None if fresh else model_args.backbone,
        fresh_model=None if not fresh else dict(
            module_name=model_args.sgraf_module_name,
            img_dim=model_args.sgraf_img_dim,
            embed_size=model_args.sgraf_embed_size,
            word_dim=model_args.sgraf_word_dim,
            sim_dim=model_args.sgraf_sim_dim,
        ),
        vocab_file=model_args.sgraf_vocab_file,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        test_split=data_args.test_split,
        validation_images=data_args.validation_images,
        max_train_samples=data_args.max_train_samples,
        eval_protocol=data_args.eval_protocol,
    )


def build_backbone(model_args: ModelArguments, sgraf: SgrafTrainingData | None = None):
    """The backbone: a model (built-in towers, fresh SGRAF) or a name/path for ``CusaModel.from_backbone``."""
    if model_args.backbone == SGRAF_BACKBONE:
        return SgrafModel(SgrafConfig(**sgraf.fresh_config))
    if model_args.backbone == BUILTIN_BACKBONE:
        from cusa_hf import dual_encoder_from_towers
        from cusa_hf.offline_models import efficientnet_lite_timm_wrapper, minilm_path

        # A sentence-transformers folder: the text tower pools (mean) and normalises as all-MiniLM-L6-v2 was trained.
        return dual_encoder_from_towers(efficientnet_lite_timm_wrapper(0), minilm_path(), model_args.projection_dim)
    return model_args.backbone


def check_backbone(model_args: ModelArguments) -> str | None:
    """Fail early (before teachers and training) on a backbone name that cannot be loaded or has no adapter;
    returns its model type (``None`` for the built-in towers)."""
    if model_args.backbone == BUILTIN_BACKBONE:
        return None
    if model_args.backbone == SGRAF_BACKBONE:
        return SgrafConfig.model_type
    from transformers import AutoConfig

    from cusa_hf import adapter_class_for

    try:
        config = AutoConfig.from_pretrained(model_args.backbone)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load backbone {model_args.backbone!r}: not a local model folder and not reachable on the Hub "
            f"({str(error).splitlines()[0]})"
        ) from None
    adapter_class_for(config.model_type)
    return config.model_type


def build_processor(model_args: ModelArguments):
    if model_args.backbone == BUILTIN_BACKBONE:
        from transformers import AutoTokenizer, VisionTextDualEncoderProcessor

        from cusa_hf.offline_models import efficientnet_lite_student_image_processor, minilm_path

        return VisionTextDualEncoderProcessor(
            image_processor=efficientnet_lite_student_image_processor(0),
            tokenizer=AutoTokenizer.from_pretrained(str(minilm_path())),
        )
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_args.processor_name or model_args.backbone)


def rerank_factory(model_args: ModelArguments, model: CusaModel):
    """The ITM reranking of a fusion backbone, or ``None`` when ``--rerank`` is off."""
    if not model_args.rerank:
        return None
    from functools import partial

    from cusa_hf.models.blip_adapter import blip_rerank_config
    from cusa_hf.models.x2vlm import x2vlm_rerank_config

    factories = {"x2vlm": x2vlm_rerank_config, "blip": blip_rerank_config}
    model_type = model.config.backbone_config.model_type
    if model_type not in factories:
        raise ValueError(f"--rerank needs a fusion backbone ({sorted(factories)}); {model_type!r} has no ITM head")
    return partial(factories[model_type], k_test=model_args.rerank_k_test)


def cache_frozen_towers(model, splits, processor, model_args, data_args, training_args):
    """Every split with the cached output of each frozen tower that can be cached (CLIP / dual encoders)."""
    options = dict(cache_dir=data_args.teacher_cache_dir, show_progress=not training_args.disable_tqdm)
    cached = {}
    for name, split in splits.items():
        if model_args.freeze_vision_tower and model.adapter.has_separable_image_tower:
            split = add_image_tower_features(
                split, model, processor.image_processor, batch_size=data_args.teacher_batch_size,
                image_root=data_args.image_root, **options,
            )  # fmt: skip
        if model_args.freeze_text_tower and model.adapter.has_separable_text_tower:
            split = add_text_tower_features(
                split, model, processor.tokenizer, batch_size=4 * data_args.teacher_batch_size,
                max_length=data_args.max_text_length, **options,
            )  # fmt: skip
        cached[name] = split
    return cached


def cusa_fields(cusa_args, enabled: bool) -> dict[str, Any]:
    fields = {name: getattr(cusa_args, name) for name in CUSA_FLAGS}
    if not enabled:
        fields.update(use_csa=False, use_usa=False)
    return fields


def train_one(
    name, enabled, model_args, data_args, cusa_args, training_args, splits, processor, data_description, command,
    sgraf=None,
):
    """Train one model (baseline or CUSA), select on validation RSUM, test once, save with a model card.
    ``sgraf`` (an SGR/SAF run) supplies the collator, the validation scorer and the test protocol."""
    set_seed(training_args.seed)
    model = CusaModel.from_backbone(build_backbone(model_args, sgraf), **cusa_fields(cusa_args, enabled))
    if model_args.freeze_vision_tower:
        freeze_tower(model.backbone.vision_model)
    if model_args.freeze_text_tower:
        freeze_tower(model.backbone.text_model)
    if model_args.cache_frozen_towers:
        # Cached by dataset and tower weights: the second run of a baseline-vs-CUSA comparison reads the first's tables.
        splits = cache_frozen_towers(model, splits, processor, model_args, data_args, training_args)
    train_dataset = splits["train"]
    run_args = dataclasses.replace(training_args, remove_unused_columns=False)  # the collator reads the raw columns
    if name != "single":
        run_args.output_dir = os.path.join(training_args.output_dir, name)
        run_args.run_name = name
    resume = training_args.resume_from_checkpoint
    if resume in ("last", "true", "True"):
        resume = last_complete_checkpoint(run_args.output_dir)
    trainer = CusaTrainer(
        model=model,
        args=run_args,
        train_dataset=train_dataset,
        eval_dataset=splits.get("validation"),
        processing_class=processor,
        data_collator=None if sgraf is None else sgraf.collator,
        collator_kwargs={"image_root": data_args.image_root, "max_length": data_args.max_text_length},
        rerank=rerank_factory(model_args, model),
        pairwise_scorer=None if sgraf is None else sgraf.validation_scorer,
    )
    trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, float] = {}
    if "validation" in splits:
        metrics.update(trainer.evaluate(splits["validation"], metric_key_prefix="validation"))
    if "test" in splits and sgraf is not None:
        test = sgraf.test
        retrieval = evaluate_sgraf(
            trainer.accelerator.unwrap_model(trainer.model).backbone, test.features, test.captions,
            test.text_to_image, sgraf.tokenizer, protocol=sgraf.protocol, show_progress=not run_args.disable_tqdm,
        )  # fmt: skip
        test_metrics = {f"test_{key}": value for key, value in retrieval.items()}
        trainer.log(test_metrics)
        metrics.update(test_metrics)
    elif "test" in splits:
        metrics.update(trainer.evaluate(splits["test"], metric_key_prefix="test"))
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(run_args.output_dir)
        write_model_card(
            run_args.output_dir,
            model.config,
            metrics,
            backbone=model_args.backbone,
            data=data_description,
            command=command,
        )
        if run_args.push_to_hub:
            trainer.push_to_hub(commit_message=f"CUSA run {name}")
    return metrics


def format_table(results: dict[str, dict[str, float]], prefix: str) -> str:
    columns = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    lines = [f"{'run':<10}" + "".join(f"{c:>9}" for c in columns)]
    for run, metrics in results.items():
        lines.append(f"{run:<10}" + "".join(f"{metrics.get(f'{prefix}_{c}', float('nan')):>9.2f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    command = "accelerate launch examples/run_cusa.py " + shlex.join(argv)
    model_args, data_args, cusa_args, training_args = parse_arguments(argv)
    CusaConfig(**cusa_fields(cusa_args, True))  # invalid CUSA settings stop here, before minutes of teacher extraction
    if training_args.process_index == 0:
        claim_output_dir(
            training_args.output_dir, cusa_args.overwrite_output_dir, training_args.resume_from_checkpoint is not None
        )
    backbone_type = check_backbone(model_args)
    if backbone_type == SgrafConfig.model_type:
        sgraf = load_sgraf_data(model_args, data_args, training_args)
        splits, processor, data_description = sgraf.splits, sgraf.tokenizer, sgraf.description
    else:
        if data_args.features_dir is not None:
            raise ValueError(f"--features_dir is for SGRAF backbones; {model_args.backbone!r} reads images")
        sgraf = None
        processor = build_processor(model_args)
        data_description = resolve_default_data(data_args, training_args.output_dir)
        splits = load_splits(data_args)
    needs_teachers = cusa_args.cusa and (
        (cusa_args.use_csa and cusa_args.csa_weight > 0) or (cusa_args.use_usa and cusa_args.usa_weight > 0)
    )
    if needs_teachers:
        if sgraf is not None:
            splits["train"] = with_image_paths(
                splits["train"], data_args.image_root, f"{data_args.features_dir}/{data_args.train_split}_image_ids.txt"
            )
        splits["train"] = reuse_or_add_teacher_features(
            splits["train"],
            image_column="image" if sgraf is None else "image_path",
            image_teacher=data_args.image_teacher,
            text_teacher=data_args.text_teacher,
            batch_size=data_args.teacher_batch_size,
            image_root=data_args.image_root,
            cache_dir=data_args.teacher_cache_dir,
        )
    runs = [("baseline", False), ("cusa", True)] if cusa_args.compare_with_baseline else [
        ("single", bool(cusa_args.cusa))
    ]
    results = {
        name if name != "single" else ("cusa" if enabled else "baseline"): train_one(
            name, enabled, model_args, data_args, cusa_args, training_args, splits, processor, data_description,
            command, sgraf,
        )
        for name, enabled in runs
    }
    if training_args.process_index == 0:
        prefix = "test" if "test" in splits else "validation"
        print(f"\n{prefix} retrieval (R@K in %, RSUM = sum of the six; i2t uses all captions of an image)")
        print(format_table(results, prefix))
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
