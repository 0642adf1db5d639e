"""CusaTrainer: ``transformers.Trainer`` that feeds teacher-feature columns to ``CusaModel``, logs CUSA's terms,
evaluates through evaluator objects (a ``RetrievalEvaluator`` by default) and, with ``loss_chunk_size``, caches
gradients over large batches.

The collator lives in ``cusa_hf.collator``, the training split's preparation in ``cusa_hf.teachers.training_split``,
the frozen towers' column check in ``cusa_hf.frozen_towers``, output folders and checkpoints in
``cusa_hf.checkpoints``, the gradient-cache pieces in ``cusa_hf.gradient_cache``; the batch-size check is here."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import datasets
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from .arguments import CusaTrainingArguments
from .backbones import adapter_class_of
from .checkpoints import (
    RunOutputsCallback,
    check_resumable,
    check_writable,
    last_complete_checkpoint,
    named_save_errors,
)
from .collator import CusaDataCollator
from .evaluation.evaluator import Evaluator, RetrievalEvaluator, SequentialEvaluator
from .frozen_towers import check_tower_columns
from .fsdp import fsdp_unsharded, vectorize_scalar_parameters
from .gradient_cache import cached_gradient_step, check_loss_chunking
from .model_card import CusaModelCardCallback, CusaModelCardData
from .optimization import parameter_groups
from .schema import TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .teachers.training_split import TrainingSplit, prepare_training_split
from .training_checks import NonFiniteTrainingError

logger = logging.getLogger(__name__)

LOSS_COMPONENTS = ("loss_itc", "loss_csa", "loss_usa")


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


#: A weight magnitude beyond which a model that stopped on a non-finite step has diverged rather than met a bad row.
LARGE_WEIGHT = 1e6


def _largest_weight(model: nn.Module) -> tuple[str, float]:
    """``(name, largest absolute value)`` over the model's floating-point parameters."""
    largest = ("", 0.0)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.numel():
            value = parameter.detach().abs().max().item()
            if value > largest[1]:
                largest = (name, value)
    return largest


class CusaTrainer(Trainer):
    """``Trainer`` for [`CusaModel`]: batches carry teacher features, logs carry CUSA's terms, temperatures and the contrastive term's scalars.

    Everything else (optimiser, schedule, accelerate/DDP, checkpointing, ``push_to_hub``) is the stock Trainer.
    When ``data_collator`` is not given, a [`CusaDataCollator`] is built from ``processing_class`` and
    ``collator_kwargs`` (column names, ``image_root``, ``max_length``).

    ``evaluate()`` calls an evaluator object ([`~cusa_hf.evaluation.evaluator.Evaluator`]: a dict of metrics, a
    ``primary_metric`` and ``greater_is_better``), by default a [`~cusa_hf.evaluation.evaluator.RetrievalEvaluator`]
    reporting ``eval_i2t_r1`` ... ``eval_t2i_r10`` and ``eval_rsum``:

    * ``evaluator``: the one given, or a list of them (a ``SequentialEvaluator``), e.g.
      ``evaluator=RetrievalEvaluator(splits["validation"], rerank=x2vlm_rerank_config)`` or
      ``evaluator=[RetrievalEvaluator(validation), StsEvaluator(sts)]`` (``cusa_hf.evaluation.unimodal_evaluators``;
      ECCV Caption: ``cusa_hf.evaluation.eccv_evaluator``);
    * otherwise one built for ``eval_dataset`` (a one-row-per-caption ``datasets.Dataset`` or a ``RetrievalEvalView``;
      a dict of them is evaluated split by split as ``eval_{name}_*``) with the collator's column names and
      ``image_root`` and ``args.per_device_eval_batch_size``. Either is kept (with its view of the split) for every
      evaluation of training;
    * ``evaluate(dataset, metric_key_prefix="test")`` evaluates another split once, with the same settings (the
      evaluator's ``for_data``; a ``RetrievalEvaluator`` when it has none).

    Wherever the model is saved (``save_model``, checkpoints, ``push_to_hub``) a model card is written beside it as
    ``README.md`` (``cusa_hf.model_card``): the run's facts from ``model_card_data`` (backbone, data, command), the
    loss settings and teachers from the model's config, and the retrieval metrics logged for the ``validation`` and
    ``test`` splits (``evaluate(split, metric_key_prefix="test")``).

    The checkpoint a run keeps is chosen on the evaluator's ``primary_metric`` (RSUM by default) with its ``greater_is_better``,
    unless ``metric_for_best_model`` names another metric: ``TrainingArguments`` falls back to ``"loss"``, which a
    retrieval evaluation does not compute.
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
        evaluator: Evaluator | Sequence[Evaluator] | None = None,
        model_card_data: CusaModelCardData | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = CusaTrainingArguments(output_dir="tmp_trainer")  # the Trainer's default folder, CUSA's columns kept
        if isinstance(evaluator, (list, tuple)):
            evaluator = SequentialEvaluator(evaluator)
        if evaluator is not None and eval_dataset is None:
            eval_dataset = evaluator.eval_data  # the stock Trainer refuses an eval_strategy without an eval_dataset
        if args.remove_unused_columns:
            # The Trainer would otherwise drop the image and teacher columns before the collator sees them.
            logger.warning("CusaTrainer sets remove_unused_columns=False: the collator needs the raw columns")
            args.remove_unused_columns = False
        if data_collator is None:
            if processing_class is None:
                raise ValueError("CusaTrainer needs a data_collator or a processing_class (the backbone's processor)")
            data_collator = CusaDataCollator(processing_class, **(collator_kwargs or {}))
        if isinstance(data_collator, CusaDataCollator) and data_collator.backbone_adapter is None:
            # Captions are tokenized as the model's backbone expects (SigLIP: padded to 64 tokens).
            data_collator.backbone_adapter = adapter_class_of(model) if model is not None else None
        if model is not None:
            check_loss_chunking(model, args)
            _copy_tokenizer_special_tokens(model.config, processing_class)
        if model is not None and train_dataset is not None:
            split = _prepare_training_split(model.config, train_dataset, data_collator)
            split = check_tower_columns(model, split, data_collator, processing_class)
            _check_contrastive_batches(args, split.dataset, getattr(model.config, "gather_features", False))
            train_dataset, data_collator = split.dataset, split.collate_with(data_collator)
        if evaluator is None and eval_dataset is not None:
            evaluator = _evaluator_for(eval_dataset, None, data_collator, args)
        _select_on_primary_metric(args, evaluator)
        self.model_card_callback = CusaModelCardCallback(model_card_data)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [TemperatureClampCallback(), self.model_card_callback, RunOutputsCallback()]
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
        self._loss_chunking_checked = False
        self.evaluator = evaluator
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            raise ValueError(
                f"CusaTrainer under FSDP needs fsdp_state_dict_type FULL_STATE_DICT (this run has "
                f"{self.accelerator.state.fsdp_plugin.state_dict_type}): with any other the Trainer saves no "
                "model.safetensors, so neither the output folder nor its checkpoints would load with "
                "CusaModel.from_pretrained"
            )
        # FSDP refuses 0-d parameters (the temperatures, CLIP's logit_scale): they train as one-element vectors and
        # ``_save`` writes them back as scalars, so a checkpoint is the same with or without FSDP.
        self._fsdp_scalar_names = vectorize_scalar_parameters(self.model) if self.is_fsdp_enabled else set()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with named_save_errors(folder):  # a full disk: torch's "basic_ios::clear: iostream error" names no file
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with named_save_errors(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None and self._fsdp_scalar_names:
            state_dict = {name: tensor.reshape(()) if name in self._fsdp_scalar_names else tensor
                          for name, tensor in state_dict.items()}  # fmt: skip
        super()._save(output_dir, state_dict=state_dict)
        self._write_model_card(output_dir or self.args.output_dir)

    def _write_model_card(self, output_dir: str) -> None:
        """The run's card as ``README.md`` (``cusa_hf.model_card``); its usage snippet loads the Hub repo when the run
        pushes, else the folder."""
        config = self.accelerator.unwrap_model(self.model).config
        self.model_card_callback.write(output_dir, config, repo_id=self.hub_model_id if self.args.push_to_hub else None)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after checking that ``output_dir`` is writable and that a checkpoint to resume from was
        trained with the same CUSA settings and teachers as this run (``True`` resumes from the last complete
        checkpoint of ``output_dir``).

        A non-finite value met in training (a row's features, a step's gradients) stops it with a
        :class:`~cusa_hf.training_checks.NonFiniteTrainingError` before the update, after saving the weights of the
        last finite step as ``checkpoint-N`` of ``output_dir`` (the message names it)."""
        if self.args.should_save:
            check_writable(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resumable(resume_from_checkpoint, self.accelerator.unwrap_model(self.model).config)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except NonFiniteTrainingError as error:
            kept = self._keep_last_finite_state(error.every_process)
            raise NonFiniteTrainingError(
                f"training stopped after step {self.state.global_step}: {error}; {kept}", error.every_process
            ) from None

    def _keep_last_finite_state(self, every_process: bool) -> str:
        """Save the weights as they are after the last finite step, as a resumable checkpoint; say where."""
        step = self.state.global_step
        if step == 0:
            return "no training step had finished, so there are no trained weights to keep"
        if self.args.world_size > 1 and not every_process:
            return (
                f"the weights of step {step} were not saved: only this process met the row, and a distributed save "
                "needs every process"
            )
        self._save_checkpoint(self.model_wrapped, trial=None)
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        name, largest = _largest_weight(self.accelerator.unwrap_model(self.model))
        kept = (
            f"the weights of step {step}, the last finite one, are saved in {folder} (CusaModel.from_pretrained loads "
            f"them; their largest magnitude is {largest:.3g}, in {name})"
        )
        if largest > LARGE_WEIGHT:
            return kept + (
                ": finite, but already blown up (a learning rate far too high?), so a resume from them would overflow "
                "again. Start again from an earlier checkpoint or the backbone with a lower learning rate"
            )
        return kept + "; resume_from_checkpoint continues from them once the cause is fixed"

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm of an optimiser step, computed before the optimiser uses the gradients:
        :class:`~cusa_hf.training_checks.NonFiniteTrainingError` when it is not finite, so that the step is not taken
        (one host synchronisation per optimiser step, where the Trainer already synchronises on the loss). fp16's
        loss scaler skips such steps itself, so its runs are left to it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and self.accelerator.scaler is None:
            value = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
            if not math.isfinite(value):
                raise NonFiniteTrainingError(
                    f"the gradients of step {self.state.global_step + 1} are not finite (gradient norm {value}), so "
                    "its update was not taken: the loss or a gradient overflowed, or an input of the batch held a NaN",
                    every_process=True,
                )
        return grad_norm

    def get_optimizer_cls_and_kwargs(self, args: TrainingArguments, model: nn.Module | None = None) -> tuple[Any, Any]:
        """The stock optimiser, with ``args.learning_rate_mapping``'s parameter groups (``cusa_hf.optimization``)
        when it is set; the Trainer builds the optimiser from the groups given as ``optimizer_dict``."""
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        mapping = getattr(args, "learning_rate_mapping", None)
        if mapping and model is not None:
            if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                raise ValueError(f"learning_rate_mapping cannot be combined with optim={args.optim!r}, which groups the "
                                 "parameters itself")  # fmt: skip
            optimizer_kwargs["optimizer_dict"] = parameter_groups(
                model, mapping, args.learning_rate, args.weight_decay, self.get_decay_parameter_names(model)
            )
        return optimizer_cls, optimizer_kwargs

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
            self._record_loss_components(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _record_loss_components(self, losses: Any) -> None:
        """Add a training step's CUSA terms and soft-label statistics (of a ``CusaOutput`` or ``CusaLossOutput``) to
        the running sums that ``log`` averages."""
        components = {name: getattr(losses, name) for name in LOSS_COMPONENTS}
        components.update(losses.softlabel_stats or {})
        for name, value in components.items():
            self._component_sums[name] = self._component_sums.get(name, 0.0) + value.detach().float()
        self._component_steps += 1

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """``Trainer.training_step``, or with ``args.loss_chunk_size`` the gradient-cached step of
        :func:`~cusa_hf.gradient_cache.cached_gradient_step` (the same update, with the activations of one chunk at a
        time)."""
        chunk_size = getattr(self.args, "loss_chunk_size", None)
        if chunk_size is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        if not self._loss_chunking_checked:
            # Again at the first step, now that the model is in training mode (live BatchNorm) and wrapped.
            check_loss_chunking(self.accelerator.unwrap_model(model), self.args, wrapped_model=model)
            self._loss_chunking_checked = True
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = cached_gradient_step(
                model, inputs, chunk_size, self.accelerator, self.current_gradient_accumulation_steps,
                on_loss=self._record_loss_components,
            )  # fmt: skip
        # As the stock step: the loss of one micro-batch of a gradient-accumulation step, for the logs.
        return loss / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps:
            steps = self._component_steps
            for name in sorted(self._component_sums):
                mean = (self._component_sums[name] / steps).to(self.args.device)
                logs[name] = round(float(self.accelerator.reduce(mean, reduction="mean")), 6)
            model = self.accelerator.unwrap_model(self.model)
            # The temperatures and the contrastive term's scalars (the sigmoid term's log-scale and bias).
            scalars = {**model.temperatures(), **model.itc_scalar_values()}
            logs.update({name: round(value, 6) for name, value in scalars.items()})
            self._component_sums.clear()
            self._component_steps = 0
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Retrieval metrics ``{metric_key_prefix}_i2t_r1`` ... ``_rsum`` and ``_runtime`` of the model, logged and
        passed to the callbacks' ``on_evaluate``. ``eval_dataset``: a split to evaluate instead of the trainer's
        (a dict of splits gives ``{metric_key_prefix}_{name}_*``); ``ignore_keys`` is unused (no model outputs)."""
        if eval_dataset is not None:
            evaluator = _evaluator_for(eval_dataset, self.evaluator, self.data_collator, self.args)
        elif self.evaluator is not None:
            evaluator = self.evaluator
        else:
            raise ValueError(
                "CusaTrainer.evaluate needs an evaluator, or an eval_dataset (one row per caption) or a "
                "RetrievalEvalView"
            )
        if isinstance(evaluator, dict):
            metrics: dict[str, float] = {}
            for name, split_evaluator in evaluator.items():
                metrics.update(self._evaluate_with(split_evaluator, f"{metric_key_prefix}_{name}"))
            return metrics
        return self._evaluate_with(evaluator, metric_key_prefix)

    def _evaluate_with(self, evaluator: Evaluator, metric_key_prefix: str) -> dict[str, float]:
        start = time.time()
        with fsdp_unsharded(self.model if self.is_fsdp_enabled else None):  # the evaluator calls get_*_features
            metrics = evaluator(
                self.model, self.processing_class, accelerator=self.accelerator, metric_key_prefix=metric_key_prefix
            )
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write this run's CUSA card into ``output_dir`` (``push_to_hub`` calls this before uploading), in place of
        the stock card; the CUSA card takes its facts from ``model_card_data`` and the logged metrics instead of these
        arguments."""
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The authors' rule (timm's ``add_weight_decay``): no weight decay on biases and 1-d parameters."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim != 1 and not name.endswith(".bias")]


def _check_contrastive_batches(args: TrainingArguments | None, dataset: Any, gather_features: bool) -> None:
    """Refuse, before training, settings that certainly give a contrastive batch of one pair (whose loss and
    gradients are exactly 0): a per-device batch of 1 (unless features are gathered across processes), a training
    set of one row, or a last batch of one row; and a stream (``IterableDataset``) without ``max_steps``."""
    if args is None:
        return
    if isinstance(dataset, datasets.IterableDataset) and args.max_steps <= 0:
        raise ValueError(
            "the training set is a stream (IterableDataset): it has no length, so num_train_epochs cannot say how long "
            "to train. Set max_steps, the number of optimiser steps (e.g. epochs x training rows / "
            "(per_device_train_batch_size x processes x gradient_accumulation_steps))"
        )
    processes = args.world_size if gather_features else 1
    batch = args.per_device_train_batch_size
    if batch * processes < 2:
        raise ValueError(
            f"per_device_train_batch_size={batch} gives contrastive batches of {batch * processes} pair: InfoNCE, CSA "
            "and USA compare the pairs of a batch with each other, so every loss and gradient would be 0. Use 2 or more"
        )
    rows = len(dataset) if hasattr(dataset, "__len__") else None
    if rows is None:
        return
    if rows < 2:
        raise ValueError(f"the training set has {rows} row(s); a contrastive batch needs at least two image-text pairs")
    if args.world_size == 1 and rows % batch == 1 and not args.dataloader_drop_last:
        batches_per_epoch = -(-rows // batch)
        # Under max_steps the epochs repeat until the step count is reached: the last batch comes once it is passed.
        if args.max_steps <= 0 or args.max_steps * args.gradient_accumulation_steps >= batches_per_epoch:
            reached = f" (max_steps={args.max_steps} reaches it)" if args.max_steps > 0 else ""
            raise ValueError(
                f"{rows} training rows in batches of {batch} leave a last batch of one pair{reached}, whose loss is 0 "
                "and which the model refuses; pass dataloader_drop_last=True or change the batch size"
            )


def _prepare_training_split(config: Any, dataset: Any, collator: Any) -> TrainingSplit:
    """The training split prepared once (``cusa_hf.teachers.training_split``): with CSA or USA on, its teacher columns
    (the collator's names) are checked against the widths the model was trained with, and their widths and
    provenance recorded in the model config."""
    feature_columns = {name: getattr(collator, name, None) for name in ("image_tower_column", "text_tower_column")}
    split = prepare_training_split(
        dataset,
        needs_teachers=getattr(config, "needs_teachers", False),
        teacher_image_column=getattr(collator, "teacher_image_column", TEACHER_IMAGE_COLUMN),
        teacher_text_column=getattr(collator, "teacher_text_column", TEACHER_TEXT_COLUMN),
        expected_dims={"image": config.teacher_image_dim, "text": config.teacher_text_dim},
        numpy_columns=[column for column in feature_columns.values() if column is not None],
    )
    if split.teacher_dims is not None:
        config.teacher_image_dim, config.teacher_text_dim = split.teacher_dims["image"], split.teacher_dims["text"]
        config.teacher_info = split.teacher_info
    return split


def _copy_tokenizer_special_tokens(config: Any, processing_class: Any) -> None:
    """Give the model config the tokenizer's special tokens where it has none. The Trainer copies them into the
    config and warns that the tokenizer has "new" tokens each time it does; a CusaConfig starts without any (CUSA
    generates no text), so for it the copy is no news. A config that holds another value still gets the warning."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))


def _evaluator_for(data: Any, given: Evaluator | None, collator: Any, args: TrainingArguments) -> Any:
    """The evaluator of a split (a dict of splits: one per split): the given evaluator if it holds that split, else
    one with its settings (``for_data``), else a ``RetrievalEvaluator`` reading the split as ``collator`` reads
    training rows, with ``args``'s evaluation batch size and progress bars."""
    if isinstance(data, dict):
        return {name: _evaluator_for(split, given, collator, args) for name, split in data.items()}
    if given is not None:
        if data is given.eval_data:
            return given
        with_settings = given.for_data(data)
        if with_settings is not None:
            return with_settings
    return RetrievalEvaluator.from_collator(
        data,
        collator,
        batch_size=args.per_device_eval_batch_size,
        text_batch_size=max(args.per_device_eval_batch_size, 64),
        show_progress=not args.disable_tqdm,
    )


def _select_on_primary_metric(args: TrainingArguments, evaluator: Any) -> None:
    """Choose the kept checkpoint on the evaluator's ``primary_metric`` when the run needs a metric and names none:
    ``TrainingArguments`` then holds ``"loss"`` (its fallback for ``load_best_model_at_end``), or nothing with
    ``save_strategy="best"``. A dict of evaluators has no single metric: name it (``"validation_rsum"``)."""
    if not isinstance(evaluator, Evaluator):  # a dict of evaluators has no one primary metric
        return
    unnamed = args.metric_for_best_model is None and args.save_strategy == SaveStrategy.BEST
    if args.metric_for_best_model == "loss" or unnamed:
        args.metric_for_best_model = evaluator.primary_metric
        args.greater_is_better = evaluator.greater_is_better
