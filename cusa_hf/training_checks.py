"""Checks that ``CusaTrainer`` runs once, when it is built, over the whole training set (instead of at every step):
contrastive batches of at least two pairs. (Teacher columns are checked with the training split's preparation,
``cusa_hf.teachers.training_split.prepare_training_split``; cached tower columns against the model's towers by
``cusa_hf.frozen_towers.check_tower_columns``.)
Rows that no check can see before training (a stream's) are checked as batches are built, and a step whose gradients
are not finite is stopped: both raise :class:`NonFiniteTrainingError`."""

from __future__ import annotations

from typing import Any

import datasets
from transformers import TrainingArguments



class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or infinite value: a training row's features (named by the message) or a step's gradients.
    ``CusaTrainer`` stops before the update and keeps the weights of the last finite step (the message says where).

    ``every_process``: every process of a distributed run raises it at the same step (the gradients are all-reduced),
    so they can save together; a row's error is raised only by the process that read the row."""

    def __init__(self, message: str, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


def check_contrastive_batches(args: TrainingArguments | None, dataset: Any, gather_features: bool) -> None:
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

