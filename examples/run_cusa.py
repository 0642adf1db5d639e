#!/usr/bin/env python
"""Fine-tune an image-text retrieval model with CUSA: train, select on validation RSUM, test once, save, push.

    accelerate launch examples/run_cusa.py                                      # built-in offline default
    accelerate launch examples/run_cusa.py examples/configs/clip_vitb32_coco_cusa.yaml --num_train_epochs 5
    python examples/run_cusa.py --backbone openai/clip-vit-base-patch32 --train_file train.json \
        --validation_file val.json --test_file test.json --output_dir out --cusa false

Arguments come from four dataclasses (model, data, CUSA, ``TrainingArguments``), from a YAML/JSON file given as
the first argument, or both (command-line flags override the file). With no arguments at all the script runs
``examples/configs/builtin_default.yaml``: a dual encoder of pretrained EfficientNet-Lite0 + MiniLM towers trained
on coco_mini (or generated data when coco_mini is absent) as the InfoNCE baseline and with CUSA, offline, on CPU.
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
from transformers.trainer_utils import get_last_checkpoint

from cusa_hf import CusaConfig, CusaModel
from cusa_hf.data import load_retrieval_dataset
from cusa_hf.model_card import write_model_card
from cusa_hf.teachers import add_teacher_features
from cusa_hf.trainer import CusaTrainer

logger = logging.getLogger("run_cusa")
EXAMPLES = Path(__file__).resolve().parent
BUILTIN_BACKBONE = "builtin:efficientnet-lite0+minilm"
BUILTIN_CONFIG = EXAMPLES / "configs" / "builtin_default.yaml"


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
    freeze_text_tower: bool = field(default=False, metadata={"help": "Freeze the text tower's weights."})
    rerank: bool = field(
        default=False,
        metadata={"help": "Evaluate fusion backbones (X2VLM, BLIP) by ITM reranking of the ITC top-k, as their papers do."},
    )
    rerank_k_test: int = field(default=256, metadata={"help": "Candidates reranked per query (256 COCO, 128 Flickr30K)."})


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


#: CusaConfig fields exposed on the command line (their defaults and types come from CusaConfig itself).
CUSA_FLAGS = (
    "csa_weight", "usa_weight", "use_csa", "use_usa", "itc_temperature", "csa_temperature", "usa_image_temperature",
    "usa_text_temperature", "learnable_temperatures", "softlabel_temperature", "softlabel_mode", "softlabel_loss",
    "itc_reduction", "cross_projection", "gather_features",
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
    ]
    for name in CUSA_FLAGS:
        spec = config_fields[name]
        specs.append((name, spec.type, field(default=spec.default, metadata={"help": f"CusaConfig.{name}"})))
    return dataclasses.make_dataclass("CusaArguments", specs)


CusaArguments = _cusa_arguments_class()


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, CusaArguments, TrainingArguments))
    if not argv:
        argv = [str(BUILTIN_CONFIG)]
    if argv[0].endswith((".yaml", ".yml", ".json")):
        config_path, argv = Path(argv[0]), argv[1:]
        if not config_path.is_file():
            raise FileNotFoundError(f"config file {config_path} does not exist")
        text = config_path.read_text()
        values = json.loads(text) if config_path.suffix == ".json" else yaml.safe_load(text)
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


def default_data_folder() -> Path | None:
    """coco_mini when it is there: ``$CUSA_COCO_MINI`` or ``../shared/data/coco_mini`` beside the repository."""
    candidate = Path(os.environ.get("CUSA_COCO_MINI", EXAMPLES.parent.parent / "shared" / "data" / "coco_mini"))
    return candidate if (candidate / "train.json").is_file() else None


def resolve_default_data(data_args: DataArguments, output_dir: str) -> str:
    """Fill in the built-in default data: coco_mini, else a generated coloured-shapes set; returns its description."""
    if data_args.train_file is not None:
        return data_args.train_file
    folder = default_data_folder()
    if folder is None:
        from synthetic_data import write_shapes_dataset

        folder = write_shapes_dataset(Path(output_dir) / "generated_shapes")
        description = f"generated coloured-shapes data ({folder}); coco_mini was not found"
    else:
        description = f"coco_mini ({folder}): 600 train / 201 test MS-COCO images, 5 captions each"
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
        image_ids = list(dict.fromkeys(train["image_id"]))
        if data_args.validation_images >= len(image_ids):
            raise ValueError(
                f"--validation_images {data_args.validation_images} leaves no training images (there are {len(image_ids)})"
            )
        held_out = set(image_ids[-data_args.validation_images :])
        in_validation = [image_id in held_out for image_id in train["image_id"]]
        splits["validation"] = train.select([i for i, flag in enumerate(in_validation) if flag])
        splits["train"] = train.select([i for i, flag in enumerate(in_validation) if not flag])
    if data_args.test_file:
        splits["test"] = load(data_args.test_file, data_args.test_split)
    if data_args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    return splits


def build_backbone(model_args: ModelArguments):
    """The backbone: a model (built-in towers) or a name/path for ``CusaModel.from_backbone``."""
    if model_args.backbone == BUILTIN_BACKBONE:
        from transformers import AutoModel

        from cusa_hf import dual_encoder_from_towers
        from cusa_hf.offline_models import efficientnet_lite_timm_wrapper, minilm_path

        text_tower = AutoModel.from_pretrained(str(minilm_path()))
        return dual_encoder_from_towers(efficientnet_lite_timm_wrapper(0), text_tower, model_args.projection_dim)
    return model_args.backbone


def check_backbone(model_args: ModelArguments) -> None:
    """Fail early (before teachers and training) on a backbone name that cannot be loaded or has no adapter."""
    if model_args.backbone == BUILTIN_BACKBONE:
        return
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


def build_processor(model_args: ModelArguments):
    if model_args.backbone == BUILTIN_BACKBONE:
        from transformers import AutoTokenizer, VisionTextDualEncoderProcessor

        from cusa_hf.offline_models import efficientnet_lite_image_processor, minilm_path

        return VisionTextDualEncoderProcessor(
            image_processor=efficientnet_lite_image_processor(0),
            tokenizer=AutoTokenizer.from_pretrained(str(minilm_path())),
        )
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_args.processor_name or model_args.backbone)


def freeze(module) -> None:
    """Freeze weights and, for CNN towers, BatchNorm statistics (frozen BN keeps using its running statistics)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    timm_model = getattr(module, "timm_model", None)
    if timm_model is not None:
        from timm.layers import freeze_batch_norm_2d

        module.timm_model = freeze_batch_norm_2d(timm_model)


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


def cusa_fields(cusa_args, enabled: bool) -> dict[str, Any]:
    fields = {name: getattr(cusa_args, name) for name in CUSA_FLAGS}
    if not enabled:
        fields.update(use_csa=False, use_usa=False)
    return fields


def train_one(name, enabled, model_args, data_args, cusa_args, training_args, splits, processor, data_description):
    """Train one model (baseline or CUSA), select on validation RSUM, test once, save with a model card."""
    set_seed(training_args.seed)
    model = CusaModel.from_backbone(build_backbone(model_args), **cusa_fields(cusa_args, enabled))
    if model_args.freeze_vision_tower:
        freeze(model.backbone.vision_model)
    if model_args.freeze_text_tower:
        freeze(model.backbone.text_model)
    run_args = dataclasses.replace(training_args)
    if name != "single":
        run_args.output_dir = os.path.join(training_args.output_dir, name)
        run_args.run_name = name
    resume = training_args.resume_from_checkpoint
    if resume in ("last", "true", "True"):
        resume = get_last_checkpoint(run_args.output_dir)
    trainer = CusaTrainer(
        model=model,
        args=run_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=processor,
        collator_kwargs={"image_root": data_args.image_root, "max_length": data_args.max_text_length},
        rerank=rerank_factory(model_args, model),
    )
    trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, float] = {}
    if "validation" in splits:
        metrics.update(trainer.evaluate(splits["validation"], metric_key_prefix="validation"))
    if "test" in splits:
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
            command="accelerate launch examples/run_cusa.py " + shlex.join(sys.argv[1:]),
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
    model_args, data_args, cusa_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_backbone(model_args)
    processor = build_processor(model_args)
    data_description = resolve_default_data(data_args, training_args.output_dir)
    splits = load_splits(data_args)
    needs_teachers = cusa_args.cusa and (
        (cusa_args.use_csa and cusa_args.csa_weight > 0) or (cusa_args.use_usa and cusa_args.usa_weight > 0)
    )
    if needs_teachers:
        splits["train"] = add_teacher_features(
            splits["train"],
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
            name, enabled, model_args, data_args, cusa_args, training_args, splits, processor, data_description
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
