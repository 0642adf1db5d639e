"""Output folders and checkpoints of a run: never replacing another run, finding the last complete checkpoint, and
refusing to resume a checkpoint with other CUSA settings or teachers."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .configuration_cusa import RESUME, CusaConfig, cusa_field_names

logger = logging.getLogger(__name__)

def check_resumable(checkpoint: str | os.PathLike, config: Any) -> None:
    """Refuse to resume ``checkpoint`` into a model whose CUSA settings or teachers differ from the checkpoint's
    (the optimiser state would not fit, or training would go on against other soft labels while the saved config
    claimed the new ones); the message names both values."""
    if not os.path.isfile(os.path.join(os.fspath(checkpoint), "config.json")):
        return  # not a CusaModel checkpoint; the stock Trainer reports what is missing
    saved = CusaConfig.from_pretrained(checkpoint)
    differences = [
        f"{name}: checkpoint {getattr(saved, name)!r}, this run {getattr(config, name, None)!r}"
        for name in cusa_field_names(RESUME)
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
