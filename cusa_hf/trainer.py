"""CusaTrainer: ``transformers.Trainer`` that feeds teacher-feature columns to ``CusaModel`` and logs CUSA's terms."""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .arguments import CusaTrainingArguments
from .data import caption_max_length
from .images import load_image
from .evaluation import RetrievalEvaluator
from .frozen_towers import IMAGE_TOWER_COLUMN, TEXT_TOWER_COLUMN, check_tower_features
from .schema import is_caption, stable_image_id  # noqa: F401  (stable_image_id re-exported)

logger = logging.getLogger(__name__)

LOSS_COMPONENTS = ("loss_itc", "loss_csa", "loss_usa")


class CusaDataCollator:
    """Turns dataset rows (image, caption, image id, teacher features) into ``CusaModel`` inputs.

    Args:
        processor: a transformers processor with ``image_processor`` and ``tokenizer`` attributes (``CLIPProcessor``,
            ``VisionTextDualEncoderProcessor``, ...).
        image_column, caption_column, image_id_column: dataset column names. The image column may hold
            ``PIL.Image``/``datasets.Image`` values or file paths (relative ones resolved against ``image_root``).
        teacher_image_column, teacher_text_column: teacher-feature columns; copied into the batch when present.
        image_tower_column: cached output of a frozen vision tower (``cusa_hf.add_image_tower_features``); when
            present it is batched as ``image_tower_features`` and no image is loaded.
        text_tower_column: cached output of a frozen text tower (``cusa_hf.add_text_tower_features``); when present it
            is batched as ``text_tower_features`` and no caption is tokenised.
        max_length: captions are truncated to this many tokens (defaults to the tokenizer's limit, 77 for CLIP).
    """

    def __init__(
        self,
        processor: Any,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str = "image_id",
        teacher_image_column: str = "teacher_image_embeds",
        teacher_text_column: str = "teacher_text_embeds",
        image_tower_column: str = IMAGE_TOWER_COLUMN,
        text_tower_column: str = TEXT_TOWER_COLUMN,
        image_root: str | None = None,
        max_length: int | None = None,
    ):
        for attribute in ("image_processor", "tokenizer"):
            if getattr(processor, attribute, None) is None:
                raise ValueError(
                    f"the processor {type(processor).__name__} has no {attribute}; pass a processor that bundles an "
                    "image processor and a tokenizer (e.g. CLIPProcessor or VisionTextDualEncoderProcessor)"
                )
        self.processor = processor
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_id_column = image_id_column
        self.teacher_image_column = teacher_image_column
        self.teacher_text_column = teacher_text_column
        self.image_tower_column = image_tower_column
        self.text_tower_column = text_tower_column
        self.image_root = image_root
        self.max_length = caption_max_length(processor.tokenizer, max_length)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("the collator got an empty batch")
        cached_tower = self.image_tower_column in rows[0]
        for column in (self.caption_column,) if cached_tower else (self.image_column, self.caption_column):
            if column not in rows[0]:
                raise ValueError(
                    f"dataset rows have no {column!r} column (columns: {sorted(rows[0])}); set the collator's column "
                    "names or rename the column"
                )
        captions = []
        for position, row in enumerate(rows):
            caption = row[self.caption_column]
            if not is_caption(caption):
                raise ValueError(
                    f"empty or non-text caption {caption!r} at batch position {position} "
                    f"(image {row.get(self.image_column)!r}); clean the data or load it with skip_invalid=True"
                )
            captions.append(caption)
        if cached_tower:
            batch = {"image_tower_features": _stack_column(rows, self.image_tower_column)}
        else:
            images = [
                load_image(row[self.image_column], self.image_root, where=f"batch position {position}")
                for position, row in enumerate(rows)
            ]
            batch = dict(self.processor.image_processor(images=images, return_tensors="pt"))
        if self.text_tower_column in rows[0]:
            batch["text_tower_features"] = _stack_column(rows, self.text_tower_column)
        else:
            text = self.processor.tokenizer(
                captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch["input_ids"] = text["input_ids"]
            if "attention_mask" in text:
                batch["attention_mask"] = text["attention_mask"]
        if self.image_id_column in rows[0]:
            batch["image_ids"] = torch.tensor(
                [stable_image_id(row[self.image_id_column]) for row in rows], dtype=torch.long
            )
        for column, key in (
            (self.teacher_image_column, "teacher_image_embeds"),
            (self.teacher_text_column, "teacher_text_embeds"),
        ):
            if column in rows[0]:
                batch[key] = _stack_column(rows, column)
        return batch


def _stack_column(rows: Sequence[dict[str, Any]], column: str) -> torch.Tensor:
    """`(len(rows), dim)` float32 tensor of a fixed-length feature column (through numpy: torch.tensor on nested
    Python lists is several times slower)."""
    return torch.from_numpy(np.asarray([row[column] for row in rows], dtype=np.float32))


class TemperatureClampCallback(TrainerCallback):
    """Clamps CUSA's learnable temperatures to their configured bounds after every optimiser step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and hasattr(model, "clamp_temperatures_"):
            model.clamp_temperatures_()


def cusa_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """[`CusaTrainingArguments`] with the authors' optimisation: AdamW, lr 1e-5, weight decay 1e-4, cosine schedule
    to 1e-6, 30 epochs, batch 128 per device, no warm-up. Any field can be overridden."""

    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        optim="adamw_torch",
        learning_rate=1e-5,
        weight_decay=1e-4,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-6},
        warmup_steps=0,
        num_train_epochs=30,
        per_device_train_batch_size=128,
        remove_unused_columns=False,
    )
    settings.update(overrides)
    return CusaTrainingArguments(**settings)


class CusaTrainer(Trainer):
    """``Trainer`` for [`CusaModel`]: batches carry teacher features, logs carry CUSA's terms and temperatures.

    Everything else (optimiser, schedule, accelerate/DDP, checkpointing, ``push_to_hub``) is the stock Trainer.
    When ``data_collator`` is not given, a [`CusaDataCollator`] is built from ``processing_class`` and
    ``collator_kwargs`` (column names, ``image_root``, ``max_length``).

    ``evaluate()`` calls a [`~cusa_hf.evaluation.RetrievalEvaluator`] and reports ``eval_i2t_r1`` ...
    ``eval_t2i_r10`` and ``eval_rsum``, so ``metric_for_best_model="rsum"`` keeps the best checkpoint:

    * ``evaluator``: the one given, built for the evaluation split with its settings (reranking, pairwise scorer,
      batch sizes), e.g. ``evaluator=RetrievalEvaluator(splits["validation"], rerank=x2vlm_rerank_config)``;
    * otherwise one built for ``eval_dataset`` (a one-row-per-caption ``datasets.Dataset`` or a ``RetrievalEvalView``;
      a dict of them is evaluated split by split as ``eval_{name}_*``) with the collator's column names and
      ``image_root`` and ``args.per_device_eval_batch_size``;
    * ``evaluate(dataset, metric_key_prefix="test")`` evaluates another split with the same settings. Evaluators (and
      so their views of the splits) are kept between evaluations.

    ``rerank`` and ``pairwise_scorer`` are deprecated: pass them to the ``RetrievalEvaluator``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        collator_kwargs: dict[str, Any] | None = None,
        evaluator: RetrievalEvaluator | None = None,
        rerank: Any = None,
        pairwise_scorer: Any = None,
        **kwargs: Any,
    ):
        deprecated = {"rerank": rerank, "pairwise_scorer": pairwise_scorer}
        deprecated = {name: value for name, value in deprecated.items() if value is not None}
        for name in deprecated:
            warnings.warn(
                f"CusaTrainer({name}=...) is deprecated and will be removed; pass "
                f"evaluator=RetrievalEvaluator(eval_dataset, {name}=...) instead",
                FutureWarning,
                stacklevel=2,
            )
        if evaluator is not None and deprecated:
            raise ValueError(f"pass {' and '.join(deprecated)} to the RetrievalEvaluator, not to CusaTrainer")
        if evaluator is not None and eval_dataset is None:
            eval_dataset = evaluator.eval_data  # the stock Trainer refuses an eval_strategy without an eval_dataset
        if args is not None and args.remove_unused_columns:
            # The Trainer would otherwise drop the image and teacher columns before the collator sees them.
            logger.warning("CusaTrainer sets remove_unused_columns=False: the collator needs the raw columns")
            args.remove_unused_columns = False
        if data_collator is None:
            if processing_class is None:
                raise ValueError("CusaTrainer needs a data_collator or a processing_class (the backbone's processor)")
            data_collator = CusaDataCollator(processing_class, **(collator_kwargs or {}))
        if model is not None and train_dataset is not None:
            check_contrastive_batches(args, train_dataset, getattr(model.config, "gather_features", False))
            check_teacher_columns(model.config, train_dataset, data_collator)
            train_dataset = check_tower_columns(model, train_dataset, data_collator, processing_class)
            train_dataset = with_numpy_feature_columns(train_dataset, data_collator)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [TemperatureClampCallback()]
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # Running sums stay on the device: no host synchronisation per step.
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_steps = 0
        self.evaluator = evaluator
        self._deprecated_eval_settings = deprecated
        self._evaluators: dict[str, RetrievalEvaluator] = {}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after checking that a checkpoint to resume from was trained with the same CUSA settings
        and teachers as this run (``True`` resumes from the last complete checkpoint of ``output_dir``)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resumable(resume_from_checkpoint, self.accelerator.unwrap_model(self.model).config)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ):
        outputs = model(**inputs, return_loss=True)
        if model.training:
            components = {name: getattr(outputs, name) for name in LOSS_COMPONENTS}
            components.update(outputs.softlabel_stats or {})
            for name, value in components.items():
                self._component_sums[name] = self._component_sums.get(name, 0.0) + value.detach().float()
            self._component_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps:
            steps = self._component_steps
            for name in sorted(self._component_sums):
                mean = (self._component_sums[name] / steps).to(self.args.device)
                logs[name] = round(float(self.accelerator.reduce(mean, reduction="mean")), 6)
            logs.update(
                {name: round(value, 6) for name, value in self.accelerator.unwrap_model(self.model).temperatures().items()}
            )
            self._component_sums.clear()
            self._component_steps = 0
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Retrieval metrics ``{metric_key_prefix}_i2t_r1`` ... ``_rsum`` and ``_runtime`` of the model, logged and
        passed to the callbacks' ``on_evaluate``. ``eval_dataset``: a split to evaluate instead of the trainer's
        (a dict of splits gives ``{metric_key_prefix}_{name}_*``); ``ignore_keys`` is unused (no model outputs)."""
        if eval_dataset is None and self.evaluator is not None:
            evaluator = self.evaluator
        else:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            if dataset is None:
                raise ValueError(
                    "CusaTrainer.evaluate needs an evaluator, or an eval_dataset (one row per caption) or a "
                    "RetrievalEvalView"
                )
            if isinstance(dataset, dict):
                metrics: dict[str, float] = {}
                for name, split in dataset.items():
                    metrics.update(self.evaluate(split, ignore_keys, f"{metric_key_prefix}_{name}"))
                return metrics
            evaluator = self._evaluator_for(dataset)
        start = time.time()
        metrics = evaluator(
            self.model, self.processing_class, accelerator=self.accelerator, metric_key_prefix=metric_key_prefix
        )
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluator_for(self, dataset: Any) -> RetrievalEvaluator:
        """The evaluator of a split, built once: the given evaluator's settings, or the trainer's (collator columns,
        eval batch size, progress bars, the deprecated ``rerank`` / ``pairwise_scorer``)."""
        if self.evaluator is not None and dataset is self.evaluator.eval_data:
            return self.evaluator
        key = getattr(dataset, "_fingerprint", None) or str(id(dataset))
        if key not in self._evaluators:
            if self.evaluator is not None:
                self._evaluators[key] = self.evaluator.for_data(dataset)
            else:
                self._evaluators[key] = RetrievalEvaluator.from_collator(
                    dataset,
                    self.data_collator,
                    batch_size=self.args.per_device_eval_batch_size,
                    text_batch_size=max(self.args.per_device_eval_batch_size, 64),
                    show_progress=not self.args.disable_tqdm,
                    **self._deprecated_eval_settings,
                )
        return self._evaluators[key]

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Keep a CUSA model card written by ``cusa_hf.model_card`` (the stock card would replace it on push)."""
        card = os.path.join(self.args.output_dir, "README.md")
        if os.path.isfile(card) and "cusa-hf" in open(card, encoding="utf-8").read():
            return
        super().create_model_card(*args, **kwargs)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The authors' rule (timm's ``add_weight_decay``): no weight decay on biases and 1-d parameters."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim != 1 and not name.endswith(".bias")]


#: CusaConfig fields that decide which parameters a model has, or what its teacher columns mean: a checkpoint resumes
#: only into a run that agrees on all of them.
RESUME_FIELDS = (
    "use_csa", "use_usa", "learnable_temperatures", "cross_projection", "projection_dim", "teacher_image_dim",
    "teacher_text_dim",
)  # fmt: skip


def check_resumable(checkpoint: str | os.PathLike, config: Any) -> None:
    """Refuse to resume ``checkpoint`` into a model whose CUSA settings or teachers differ from the checkpoint's
    (the optimiser state would not fit, or training would go on against other soft labels while the saved config
    claimed the new ones); the message names both values."""
    from .configuration_cusa import CusaConfig

    if not os.path.isfile(os.path.join(os.fspath(checkpoint), "config.json")):
        return  # not a CusaModel checkpoint; the stock Trainer reports what is missing
    saved = CusaConfig.from_pretrained(checkpoint)
    differences = [
        f"{name}: checkpoint {getattr(saved, name)!r}, this run {getattr(config, name, None)!r}"
        for name in RESUME_FIELDS
        if getattr(saved, name) is not None and getattr(saved, name) != getattr(config, name, None)
    ]
    if saved.backbone_config.model_type != config.backbone_config.model_type:
        differences.append(
            f"backbone: checkpoint {saved.backbone_config.model_type!r}, this run {config.backbone_config.model_type!r}"
        )
    for column, info in (saved.teacher_info or {}).items():
        current = (getattr(config, "teacher_info", None) or {}).get(column, {})
        for key in ("name_or_path", "dim", "weights_sha256"):
            if info.get(key) != current.get(key):
                differences.append(f"{column} {key}: checkpoint {info.get(key)!r}, this run {current.get(key)!r}")
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained with other settings ({'; '.join(differences)}). Resume "
            "with the checkpoint's settings and teachers, or start a new run in another output_dir"
        )


def claim_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, resuming: bool = False) -> None:
    """Make sure a new run does not write over another run's results.

    A missing or empty folder is fine. A folder that holds anything is refused unless the run resumes from it
    (``resuming``) or ``overwrite`` is set, in which case its contents are deleted first (so no checkpoint of the old
    run is left for a later ``resume_from_checkpoint`` to pick up).
    """
    import shutil

    folder = os.fspath(output_dir)
    if not os.path.isdir(folder) or not os.listdir(folder) or resuming:
        return
    if not overwrite:
        shown = ", ".join(sorted(os.listdir(folder))[:6])
        raise ValueError(
            f"the output folder {folder} already holds a run ({shown}); pass overwrite_output_dir=True to replace it, "
            "resume_from_checkpoint to continue it, or another output_dir"
        )
    logger.warning("overwrite_output_dir: deleting the earlier run in %s", folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that was saved completely, to resume from.

    The Trainer writes ``trainer_state.json`` last when it saves a checkpoint, so a folder without it was cut off
    while saving (a killed run): it is skipped with a warning and the previous complete checkpoint is returned.

    Raises:
        FileNotFoundError: ``output_dir`` does not exist.
        ValueError: it holds no complete checkpoint, so there is nothing to resume.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot resume: the output folder {folder} does not exist")
    numbered = []
    for name in os.listdir(folder):
        prefix, _, number = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
            numbered.append((int(number), os.path.join(folder, name)))
    for _, path in sorted(numbered, reverse=True):
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning("skipping %s: it has no trainer_state.json, so its saving was cut off", path)
    raise ValueError(
        f"nothing to resume in {folder}: it holds no complete checkpoint-N folder (checkpoints are written with "
        "save_strategy 'steps' or 'epoch'). Start the run without resume_from_checkpoint"
    )


def check_contrastive_batches(args: TrainingArguments | None, dataset: Any, gather_features: bool) -> None:
    """Refuse, before training, settings that certainly give a contrastive batch of one pair (whose loss and
    gradients are exactly 0): a per-device batch of 1 (unless features are gathered across processes), a training
    set of one row, or a last batch of one row."""
    if args is None:
        return
    processes = args.world_size if gather_features else 1
    batch = args.per_device_train_batch_size
    if batch * processes < 2:
        raise ValueError(
            f"per_device_train_batch_size={batch} gives contrastive batches of {batch * processes} pair: InfoNCE, CSA "
            "and USA compare the pairs of a batch with each other, so every loss and gradient would be 0. Use 2 or more"
        )
    rows = len(dataset) if hasattr(dataset, "__len__") else None
    if rows is None or args.max_steps > 0:
        return
    if rows < 2:
        raise ValueError(f"the training set has {rows} row(s); a contrastive batch needs at least two image-text pairs")
    if args.world_size == 1 and rows % batch == 1 and not args.dataloader_drop_last:
        raise ValueError(
            f"{rows} training rows in batches of {batch} leave a last batch of one pair, whose loss is 0; pass "
            "dataloader_drop_last=True or change the batch size"
        )


def with_numpy_feature_columns(dataset: Any, collator: Any) -> Any:
    """The dataset with its feature columns (teacher and cached tower features) read as numpy arrays: the collator
    stacks them, and turning every float of a batch into a Python object first costs more than a cached-tower step."""
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    names = ("teacher_image_column", "teacher_text_column", "image_tower_column", "text_tower_column")
    columns = [getattr(collator, name, None) for name in names]
    columns = [column for column in columns if column in dataset.column_names]
    if not columns or dataset.format["type"] is not None:
        return dataset
    return dataset.with_format("numpy", columns=columns, output_all_columns=True)


def check_tower_columns(model: Any, dataset: Any, collator: Any, processor: Any) -> Any:
    """Check the cached frozen-tower columns of a dataset against ``model`` (weights, width, preprocessing) and
    return the dataset without the raw column a cached tower replaces (so images are not decoded at every step)."""
    columns = getattr(dataset, "column_names", None) or []
    checks = (
        ("image", getattr(collator, "image_tower_column", None), getattr(processor, "image_processor", None),
         getattr(collator, "image_column", "image")),
        ("text", getattr(collator, "text_tower_column", None), getattr(processor, "tokenizer", None), None),
    )  # fmt: skip
    for modality, column, preprocessing, replaced in checks:
        if column in columns:
            check_tower_features(
                model, dataset, modality, column, preprocessing, max_length=getattr(collator, "max_length", None)
            )
            if replaced in columns:
                dataset = dataset.remove_columns([replaced])
    return dataset


def check_teacher_columns(config: Any, dataset: Any, collator: Any) -> None:
    """Fail before training when CSA/USA are active but the teacher columns are missing, malformed (NaN, ragged) or
    of another teacher than the model was trained with; record their provenance and widths in the model config."""
    if not getattr(config, "needs_teachers", False) or getattr(dataset, "column_names", None) is None:
        return
    from .teachers import check_teacher_features

    image_column = getattr(collator, "teacher_image_column", "teacher_image_embeds")
    text_column = getattr(collator, "teacher_text_column", "teacher_text_embeds")
    for column in (image_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"CSA/USA are on but the training dataset has no {column!r} column (columns: {dataset.column_names}). "
                "Compute the teacher features once with cusa_hf.add_teacher_features(dataset, image_teacher=..., "
                "text_teacher=...) or the cusa-extract-teachers CLI, or train the baseline with use_csa=False, "
                "use_usa=False."
            )
    expected = {
        modality: {"dim": dim}
        for modality, dim in (("image", config.teacher_image_dim), ("text", config.teacher_text_dim))
        if dim is not None
    }
    provenance = check_teacher_features(dataset, image_column, text_column, expected=expected or None)
    config.teacher_image_dim = len(dataset[0][image_column])
    config.teacher_text_dim = len(dataset[0][text_column])
    config.teacher_info = {column: info for column, info in provenance.items() if info} or None
