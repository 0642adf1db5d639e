"""Output folders and checkpoints of a run: claiming a folder (never replacing another run, one run at a time, writable),
finding the last complete checkpoint, and refusing to resume a checkpoint with other CUSA settings or teachers."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import modeling_cusa
from .configuration_cusa import RESUME, CusaConfig, cusa_field_names

logger = logging.getLogger(__name__)

#: The lock a run holds on its output folder while it runs (:func:`claim_output_dir`). Its name starts with ``_``,
#: which the Trainer's ``push_to_hub`` leaves out of the upload.
LOCK_FILE = "_cusa_run.lock"
#: Seconds after which a lock file without a readable record counts as left by a run that died while creating it.
UNREADABLE_LOCK_AGE = 60
#: ``resume_from_checkpoint`` values that mean the last complete checkpoint of the run's own output folder.
RESUME_LATEST = ("last", "true", "True")
#: The run manifest: what runs recorded they wrote into an output folder (:func:`run_outputs`), the only entries
#: ``overwrite_output_dir`` deletes. Its leading ``_`` keeps it out of ``push_to_hub`` uploads, as the lock's does.
RUN_MANIFEST = "_cusa_run_outputs.json"
#: The locks this process holds, by lock file.
_HELD_LOCKS: dict[str, "OutputDirLock"] = {}


def check_resumable(checkpoint: str | os.PathLike, config: Any) -> None:
    """Refuse to resume ``checkpoint`` into a model whose CUSA settings or teachers differ from the checkpoint's
    (the optimiser state would not fit, or training would go on against other soft labels while the saved config
    claimed the new ones); the message names both values."""
    if not os.path.isfile(os.path.join(os.fspath(checkpoint), "config.json")):
        return  # not a CusaModel checkpoint; the stock Trainer reports what is missing
    damaged = modeling_cusa.damaged_weights_file(checkpoint)
    if damaged is not None:
        raise OSError(f"cannot resume from {checkpoint}: {damaged}")
    if os.path.exists(os.path.join(os.fspath(checkpoint), "trainer_state.json")):
        problem = _incomplete_checkpoint(os.fspath(checkpoint))
        if problem is not None:
            raise OSError(f"cannot resume from {checkpoint}: {problem}; its saving was cut off. Resume from an earlier "
                          "checkpoint (resume_from_checkpoint='last' takes the newest complete one)")
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


def claim_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    resume_from_checkpoint: str | os.PathLike | bool | None = None,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> "OutputDirLock":
    """Claim ``output_dir`` for a new run, making sure the run replaces no other run's results and none of its own
    inputs, and return the lock that keeps other runs out of the folder until it is released (at the latest when the
    process exits). What the run writes into the folder is recorded in its manifest :data:`RUN_MANIFEST`
    (:meth:`OutputDirLock.record_outputs`).

    * The folder is created if needed and must be writable (a run that could not save would lose its training).
    * ``inputs`` (name → path: the backbone, the processor, data files) must not be the folder or lie inside it: the
      run would write its model over them, and an overwrite would delete them. Such a claim is refused, naming both.
    * The lock file :data:`LOCK_FILE` is created atomically and records this process (id, host, start time). A folder
      locked by a live run, or lying inside a folder that a live run holds (a comparison's ``X/cusa`` while it holds
      ``X``), is refused, naming that run's process; a lock whose process is gone (a killed run, on this host) is
      taken over with a warning.
    * A missing or empty folder is fine. A folder that holds anything is refused unless the run resumes from a
      checkpoint inside it (``resume_from_checkpoint`` a path in the folder, ``True`` or one of
      :data:`RESUME_LATEST`), or ``overwrite`` is set. A resume from a checkpoint elsewhere does not make a full folder
      acceptable: the resumed run would replace the folder's model and results.
    * ``overwrite`` deletes only what earlier runs recorded they wrote (:func:`run_outputs`), so no checkpoint of the
      old run is left for a later resume to pick up. A folder that also holds anything no run recorded (the user's
      files, or a run's from before the manifest), or a live run's lock anywhere beneath it, is refused, naming them,
      and nothing is deleted.

    Raises:
        ValueError: the folder holds another run (or files of the user's, or an input), or a live run holds it.
        OSError: the folder cannot be created or written to.
    """
    folder = os.fspath(output_dir)
    _check_inputs_outside(folder, inputs or {})
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise _unwritable(folder, error) from None
    _check_no_live_lock_above(folder)
    lock = _take_lock(folder)
    try:
        _check_claim(folder, overwrite, resume_from_checkpoint)
    except BaseException:
        lock.release()
        raise
    lock.present_at_claim = set(os.listdir(folder))
    return lock


def _check_inputs_outside(folder: str, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    for name, path in inputs.items():
        if path is not None and os.path.exists(os.fspath(path)) and _inside(os.fspath(path), folder):
            raise ValueError(
                f"{name}={os.fspath(path)!r} is, or lies inside, output_dir={folder!r}: the run would write its model, "
                "checkpoints and results over its own input (and overwrite_output_dir would delete it). Nothing was "
                "touched; choose an output_dir outside the run's inputs"
            )


def _check_no_live_lock_above(folder: str) -> None:
    """Refuse a folder inside one that a live run holds: that run may write (or delete) there."""
    child, parent = os.path.realpath(folder), os.path.dirname(os.path.realpath(folder))
    while parent != child:
        path = os.path.join(parent, LOCK_FILE)
        if os.path.isfile(path):
            holder = _read_lock(path)
            if not _is_stale(path, holder):
                held = _held_message(parent, path, holder)
                raise ValueError(f"{folder} lies inside a live run's output folder: {held}")
        child, parent = parent, os.path.dirname(parent)


def _check_claim(folder: str, overwrite: bool, resume: str | os.PathLike | bool | None) -> None:
    """Refuse a claim of ``folder`` that would replace another run (:func:`claim_output_dir`); delete the earlier
    run's recorded outputs when ``overwrite`` asks for it."""
    held = sorted(name for name in os.listdir(folder) if name != LOCK_FILE)
    resuming = resume not in (None, False)
    if resuming and (resume is True or resume in RESUME_LATEST or _inside(os.fspath(resume), folder)):
        if overwrite:
            raise ValueError(
                f"overwrite_output_dir=True would delete the checkpoint that resume_from_checkpoint={resume!r} "
                f"continues from (in {folder}); set only one of them"
            )
        return
    if not held:
        return
    listed = [name for name in held if name != RUN_MANIFEST]
    shown = ", ".join(listed[:6]) + (", ..." if len(listed) > 6 else "")
    if resuming and not overwrite:
        raise ValueError(
            f"resume_from_checkpoint={os.fspath(resume)!r} lies outside output_dir={folder!r}, which already holds a "
            f"run ({shown}): the resumed run would replace its model and results. Resume into the checkpoint's own run "
            f"folder (output_dir={os.path.dirname(os.path.abspath(os.fspath(resume)))!r}) or into an empty output_dir"
        )
    if not overwrite:
        raise ValueError(
            f"the output folder {folder} already holds a run ({shown}); pass overwrite_output_dir=True to replace it, "
            "resume_from_checkpoint to continue it, or another output_dir"
        )
    recorded = set(run_outputs(folder))
    foreign = [
        name + ("/" if os.path.isdir(os.path.join(folder, name)) else "") for name in held if name not in recorded
    ]
    if foreign:
        shown_foreign = ", ".join(foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        raise ValueError(
            f"overwrite_output_dir=True deletes only what runs recorded they wrote ({RUN_MANIFEST}), but the output "
            f"folder {folder} holds what no run recorded ({shown_foreign}); nothing was deleted. Move them elsewhere "
            "(or delete them yourself) or choose another output_dir"
        )
    live = _live_locks_beneath(folder)
    if live:
        raise ValueError(
            f"overwrite_output_dir=True would delete a live run's folder: {live[0]}. Nothing was deleted; wait for "
            "that run to end or choose another output_dir"
        )
    logger.warning("overwrite_output_dir: deleting the earlier run in %s (%s)", folder, shown)
    for name in held:
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The entries of ``output_dir`` (top-level names) that runs recorded they wrote in its manifest
    :data:`RUN_MANIFEST` (checkpoints, the model with its processor and card, results, logs, a comparison's run
    folders), with the manifest itself: what ``overwrite_output_dir`` may delete. Empty without a manifest."""
    path = os.path.join(os.fspath(output_dir), RUN_MANIFEST)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)["entries"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: the run manifest cannot be read ({error}); nothing was deleted") from None
    return sorted({*entries, RUN_MANIFEST, RUN_MANIFEST + ".tmp"})


def _live_locks_beneath(folder: str) -> list[str]:
    """Lock files of live runs in the subfolders of ``folder``, each with the message naming its run."""
    live = []
    for root, _, files in os.walk(folder):
        if root != folder and LOCK_FILE in files:
            path = os.path.join(root, LOCK_FILE)
            holder = _read_lock(path)
            if not _is_stale(path, holder):
                live.append(_held_message(root, path, holder))
    return live


def _inside(path: str, folder: str) -> bool:
    resolved, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([resolved, root]) == root


class SaveFailedError(OSError):
    """Saving a model or checkpoint failed while writing (a full disk, a quota, a lost mount); names the folder."""


#: What torch's writer says when the file under it cannot be written (it raises RuntimeError, not OSError).
_TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter", "unexpected pos")


@contextlib.contextmanager
def named_save_errors(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write while saving into ``folder`` (``OSError``, or torch's ``RuntimeError: basic_ios::clear:
    iostream error``) into a :class:`SaveFailedError` naming the folder, the cause and its disk's free space."""
    try:
        yield
    except SaveFailedError:
        raise
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(text in str(error) for text in _TORCH_WRITE_FAILURES):
            raise
        existing = os.path.abspath(os.fspath(folder))
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free / 2**20
        cause = "its disk is full" if free < 64 or getattr(error, "errno", None) == 28 else "the write failed"
        raise SaveFailedError(
            f"could not save into {os.fspath(folder)}: {cause} ({type(error).__name__}: {error}; {free:.0f} MiB free). "
            "What was saved there may be incomplete; earlier checkpoints are untouched. Free space (or choose another "
            "output_dir) and resume from the last complete checkpoint"
        ) from error


def check_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir`` if needed and write (and delete) a small file in it, so that a run that could not save
    stops before it trains rather than after.

    Raises:
        OSError: naming the folder and the reason (no permission, a full disk, a file in the way).
    """
    folder = os.fspath(output_dir)
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix="_cusa_write_check", dir=folder)
        try:
            os.write(descriptor, b"0")
        finally:
            os.close(descriptor)
            os.remove(probe)
    except OSError as error:
        raise _unwritable(folder, error) from None


def _unwritable(folder: str, error: OSError) -> OSError:
    return type(error)(
        f"cannot write to the output folder {folder} ({error.strerror or error}): the run could not save its model, "
        "checkpoints or results there. Make it writable (and check that its disk has room) or choose another output_dir"
    )


class OutputDirLock:
    """A run's claim on its output folder (:func:`claim_output_dir`): the lock file, removed by :meth:`release`, by
    leaving a ``with`` block, or when the process exits; and the record of what the run wrote there."""

    def __init__(self, path: str, token: str):
        self.path = path
        self.token = token
        #: The folder's entries when it was claimed (set by :func:`claim_output_dir`); the run wrote what came after.
        self.present_at_claim: set[str] | None = None
        _HELD_LOCKS[os.path.realpath(path)] = self
        atexit.register(self.release)

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def record_outputs(self, about_to_write: Iterable[str] = ()) -> None:
        """Add to the folder's manifest :data:`RUN_MANIFEST` every entry that appeared in the folder since the claim,
        and the entries named in ``about_to_write`` (a checkpoint about to be saved: were the run killed while saving
        it, a later overwrite still knows the cut folder as the run's). Written atomically, only when it changes."""
        if self.present_at_claim is None:
            return
        recorded = set(run_outputs(self.folder)) - {RUN_MANIFEST, RUN_MANIFEST + ".tmp"}
        entries = recorded | set(about_to_write)
        with contextlib.suppress(FileNotFoundError):
            entries |= set(os.listdir(self.folder)) - self.present_at_claim - {LOCK_FILE, RUN_MANIFEST}
        if entries == recorded:
            return
        path = os.path.join(self.folder, RUN_MANIFEST)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump({"entries": sorted(entries)}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path + ".tmp", path)

    def release(self) -> None:
        """Record what the run wrote (:meth:`record_outputs`) and remove the lock file, if this lock still holds it (a
        second call does nothing)."""
        if _HELD_LOCKS.get(os.path.realpath(self.path)) is not self:
            return
        try:
            self.record_outputs()
        except OSError as error:  # a full disk: keep the lock's release, and the error that ended the run, going
            logger.warning("could not record what the run wrote in %s (%s): a later overwrite_output_dir will refuse "
                           "the unrecorded entries, naming them", os.path.join(self.folder, RUN_MANIFEST), error)
        del _HELD_LOCKS[os.path.realpath(self.path)]
        atexit.unregister(self.release)
        if (_read_lock(self.path) or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def record_run_outputs(path: str | os.PathLike, about_to_write: Iterable[str | os.PathLike] = ()) -> None:
    """Record what a run wrote under ``path`` in the manifest of the output folder that this process's lock holds on
    ``path`` or a folder above it (a comparison's ``X`` for ``X/cusa``); nothing when it holds none (another process
    of a distributed run, or a run that claimed no folder). ``about_to_write``: paths the run is about to write."""
    for lock in list(_HELD_LOCKS.values()):
        if _inside(os.fspath(path), lock.folder):
            root = os.path.realpath(lock.folder)
            lock.record_outputs(
                os.path.relpath(os.path.realpath(os.fspath(entry)), root).split(os.sep)[0] for entry in about_to_write
            )


class RunOutputsCallback(TrainerCallback):
    """Keeps the output folder's run manifest (:func:`record_run_outputs`) up to date while the Trainer writes:
    a checkpoint is recorded just before it is saved and everything else after each save, so that a run killed with
    ``kill -9`` still leaves a record of what it wrote for a later ``overwrite_output_dir``."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if control.should_save and args.should_save:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            record_run_outputs(args.output_dir, [checkpoint])

    on_epoch_end = on_step_end

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            record_run_outputs(args.output_dir)


def _take_lock(folder: str) -> OutputDirLock:
    """Create ``folder``'s lock file atomically, recording this process; take over a stale lock once."""
    path = os.path.join(folder, LOCK_FILE)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "created": time.time(),
        "token": uuid.uuid4().hex,
    }
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if not _is_stale(path, holder):
                raise ValueError(_held_message(folder, path, holder)) from None
            logger.warning(
                "%s: taking over the stale lock of process %s on %s, which no longer runs (a run that was killed)",
                folder, (holder or {}).get("pid", "?"), (holder or {}).get("host", "?"),
            )  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        except OSError as error:
            raise _unwritable(folder, error) from None
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(path)
            raise _unwritable(folder, error) from None
        return OutputDirLock(path, record["token"])
    raise ValueError(f"{path}: another run took the output folder's lock while this one replaced a stale lock")


def _read_lock(path: str) -> dict[str, Any] | None:
    """The record in a lock file; ``None`` when it is missing or unreadable (being written, or cut off)."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_stale(path: str, holder: dict[str, Any] | None) -> bool:
    """Whether the run that wrote a lock is certainly gone: its process no longer runs on this host (or another
    process has taken its id since). A lock of another host is never stale here: its process cannot be seen."""
    if holder is None:
        # Its writer died between creating and filling it, or is filling it right now.
        try:
            return time.time() - os.path.getmtime(path) > UNREADABLE_LOCK_AGE
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if pid == os.getpid():
        return os.path.realpath(path) not in _HELD_LOCKS  # this process's id, reused after the locking one died
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's live process
    started = holder.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)


def _held_message(folder: str, path: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return f"the output folder {folder} is being claimed by another run right now ({path}); choose another output_dir"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("created", 0)))
    message = (
        f"the output folder {folder} is in use by another run: process {holder.get('pid')} on {holder.get('host')} "
        f"has held its lock {path} since {since}. Wait for that run to end, or choose another output_dir"
    )
    if holder.get("host") != socket.gethostname():
        message += f" (if that run is gone, delete {path}: a lock of another host cannot be checked from here)"
    return message


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), to tell it from a later process that
    got the same id; ``None`` where ``/proc`` is not available."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that was saved completely, to resume from.

    The Trainer writes ``trainer_state.json`` last when it saves a checkpoint, so a folder without it, or with one
    that does not read as JSON (cut off half-written), was cut off while saving (a killed run): it is skipped with a
    warning naming the file and the previous complete checkpoint is returned.

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
        problem = _incomplete_checkpoint(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s, so its saving was cut off", path, problem)
    raise ValueError(
        f"nothing to resume in {folder}: it holds no complete checkpoint-N folder (checkpoints are written with "
        "save_strategy 'steps' or 'epoch'). Start the run without resume_from_checkpoint"
    )


def _incomplete_checkpoint(path: str) -> str | None:
    """Why the checkpoint folder ``path`` was not saved completely (its ``trainer_state.json``, written last, is
    missing or cut off); ``None`` when it was."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "it has no trainer_state.json"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        return f"its {state} does not read whole ({error})"
    return None
