"""Torch's CPU thread count under a bare ``accelerate launch``: one process on a machine without a GPU gets every core.

``accelerate launch`` without ``--cpu`` and without ``--num_cpu_threads_per_process`` starts the script with
``OMP_NUM_THREADS=1`` (unless ``OMP_NUM_THREADS`` was already set, which it passes on), so torch computes on one
core, the right choice for one process per GPU and a slow one for the only process on a CPU machine. Every process it
starts also gets ``ACCELERATE_USE_CPU``, which ``python script.py`` and ``torchrun`` do not set.

A count the user chose is kept. A count above one is always the user's (or accelerate's ``--cpu`` choice); a count of
one is the user's when the launcher was given ``--num_cpu_threads_per_process`` or itself ran with
``OMP_NUM_THREADS`` set, which the launcher's command line and environment (the parent process) tell.
"""

from __future__ import annotations

import logging
import os

import psutil
import torch

logger = logging.getLogger(__name__)

#: Set by ``accelerate launch`` for every process it starts.
ACCELERATE_LAUNCH_ENV = "ACCELERATE_USE_CPU"
THREADS_ENV = "OMP_NUM_THREADS"
THREADS_FLAG = "--num_cpu_threads_per_process"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as ``nproc`` counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _launcher_settings() -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the process that started this one (``accelerate launch``)."""
    parent = psutil.Process().parent()
    if parent is None:
        raise psutil.NoSuchProcess(os.getppid())
    return parent.cmdline(), parent.environ()


def _user_set_one_thread() -> str | None:
    """Why ``OMP_NUM_THREADS=1`` is the user's choice rather than accelerate's default, or ``None`` when it is the
    default. Raises ``psutil.Error`` when the launcher cannot be read."""
    command_line, environment = _launcher_settings()
    if any(arg == THREADS_FLAG or arg.startswith(THREADS_FLAG + "=") for arg in command_line):
        return f"accelerate launch was given {THREADS_FLAG}"
    if THREADS_ENV in environment:
        return f"accelerate launch ran with {THREADS_ENV}={environment[THREADS_ENV]}"
    return None


def use_every_cpu_core(device: torch.device | str, num_processes: int) -> int | None:
    """Compute on every core when this is the only process of a CPU run started by ``accelerate launch`` with its
    one-thread default; log what was done and why.

    Args:
        device: the device the run computes on (``TrainingArguments.device``).
        num_processes: the processes of the run (``TrainingArguments.world_size``).

    Raises:
        ValueError: ``OMP_NUM_THREADS`` is set to something other than a positive whole number (a bare
            ``accelerate launch`` reads it first and fails with its own error; ``python`` and ``torchrun`` starts
            reach this check).

    Returns:
        The number of threads torch now uses, or ``None`` when the thread count was left as it was: a run on an
        accelerator, several processes, a start without ``accelerate launch`` (torch then uses every core unless
        ``OMP_NUM_THREADS`` says otherwise), or a count the user chose.
    """
    chosen = os.environ.get(THREADS_ENV)
    if chosen is not None and not (chosen.strip().isdigit() and int(chosen) > 0):
        # OpenMP ignores such a value with at most a warning, leaving the count to chance.
        raise ValueError(
            f"the environment variable {THREADS_ENV}={chosen!r} is not a positive whole number of CPU threads; set it "
            "to a count (e.g. 4) or unset it"
        )
    if torch.device(device).type != "cpu" or num_processes != 1 or ACCELERATE_LAUNCH_ENV not in os.environ:
        return None
    if os.environ.get(THREADS_ENV) != "1":
        return None
    cores = available_cores()
    if cores == 1:
        return None
    try:
        reason = _user_set_one_thread()
    except psutil.Error as error:
        # Without the launcher's settings a one-thread request cannot be told from the default: keep it.
        logger.info("computing on 1 CPU thread (%s=1; the launcher's settings could not be read: %r)", THREADS_ENV, error)
        return None
    if reason is not None:
        logger.info("computing on 1 CPU thread of %d, as asked: %s", cores, reason)
        return None
    torch.set_num_threads(cores)  # as accelerate itself sets the threads of its multi-process CPU runs
    logger.info(
        "computing on all %d CPU cores: accelerate launch set %s=1, its default unless told the run is on CPU, and "
        "this is the only process of a run on CPU (%s N, or %s=N before accelerate launch, chooses the count)",
        cores, THREADS_ENV, THREADS_FLAG, THREADS_ENV,
    )  # fmt: skip
    return cores
