"""Output folders (cusa_hf.checkpoints): overwriting deletes only what a run wrote, a resume never replaces another
run, a lock keeps two runs out of one folder, and an unwritable folder stops a run before it trains."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_cusa_model

from cusa_hf.checkpoints import LOCK_FILE, check_resumable, claim_output_dir

CLAIM_IN_ANOTHER_PROCESS = r"""
import sys
from cusa_hf.checkpoints import claim_output_dir
try:
    claim_output_dir(sys.argv[1]).release()
except ValueError as error:
    print("REFUSED", error)
else:
    print("CLAIMED")
"""


def claim_elsewhere(folder) -> str:
    """What ``claim_output_dir(folder)`` says in another Python process."""
    process = subprocess.run([sys.executable, "-c", CLAIM_IN_ANOTHER_PROCESS, str(folder)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    return process.stdout.strip()


def finished_run(folder: Path) -> Path:
    """What a finished run leaves: checkpoints, the model with its processor and card, results."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("model.safetensors", "config.json", "modeling_cusa.py", "losses.py", "README.md", "results.json",
                 "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "trainer_state.json"):
        (folder / name).write_text("x")  # fmt: skip
    return folder


def test_overwrite_deletes_what_runs_wrote_and_refuses_a_folder_with_other_files(tmp_path):
    run = finished_run(tmp_path / "run")
    (run / "cusa").mkdir()
    finished_run(run / "cusa")
    claim_output_dir(run, overwrite=True).release()
    assert not any(run.iterdir())

    mine = finished_run(tmp_path / "mine")
    for name in ("train.json", "test.json", "notes.txt"):
        (mine / name).write_text("the user's own")
    before = sorted(path.name for path in mine.iterdir())
    with pytest.raises(ValueError, match=r"holds files that no run wrote \(notes.txt, test.json, train.json\)"):
        claim_output_dir(mine, overwrite=True)
    assert sorted(path.name for path in mine.iterdir()) == before  # nothing deleted
    # A comparison folder holding a file of the user's is not a run's folder either.
    (run / "cusa").mkdir()
    (run / "cusa" / "draft.md").write_text("mine")
    with pytest.raises(ValueError, match=r"no run wrote \(cusa/draft.md\)"):
        claim_output_dir(run, overwrite=True)
    assert (run / "cusa" / "draft.md").is_file()


def test_a_resume_from_elsewhere_never_replaces_a_finished_run(tmp_path):
    finished = finished_run(tmp_path / "finished")
    other = finished_run(tmp_path / "other")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='.*other/checkpoint-2' lies outside output_dir="):
        claim_output_dir(finished, resume_from_checkpoint=str(other / "checkpoint-2"))
    assert (finished / "model.safetensors").read_text() == "x"
    # Into the checkpoint's own run folder, or a new one, it resumes.
    claim_output_dir(other, resume_from_checkpoint=str(other / "checkpoint-2")).release()
    claim_output_dir(other, resume_from_checkpoint="last").release()
    claim_output_dir(tmp_path / "new", resume_from_checkpoint=str(other / "checkpoint-2")).release()
    # Overwriting the folder a resume reads from would delete its checkpoint.
    with pytest.raises(ValueError, match="overwrite_output_dir=True would delete the checkpoint"):
        claim_output_dir(other, overwrite=True, resume_from_checkpoint="last")
    assert (other / "checkpoint-2").is_dir()


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    folder = tmp_path / "run"
    lock = claim_output_dir(folder)
    assert not any(path.name != LOCK_FILE for path in folder.iterdir())  # still empty: the first run has not saved
    record = json.loads((folder / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    answer = claim_elsewhere(folder)
    assert answer.startswith("REFUSED") and f"process {os.getpid()} on {socket.gethostname()}" in answer
    with pytest.raises(ValueError, match=f"process {os.getpid()}"):
        claim_output_dir(folder)  # this process's own run holds it too
    lock.release()
    assert not (folder / LOCK_FILE).exists()
    assert claim_elsewhere(folder) == "CLAIMED"


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    import logging

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "process_start": None, "created": 0}
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING):
        claim_output_dir(folder).release()
    assert f"stale lock of process {stale['pid']}" in caplog.text


def test_an_unwritable_output_folder_stops_the_run_before_it_trains(tmp_path, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    real_open = os.open

    def refuse_writes(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_writes)
    with pytest.raises(PermissionError, match=r"cannot write to the output folder .*read_only.*Permission denied"):
        claim_output_dir(folder)
    from cusa_hf.checkpoints import check_writable

    with pytest.raises(PermissionError, match="cannot write to the output folder"):
        check_writable(folder)
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes into read-only folders
        folder.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match="cannot write to the output folder"):
                claim_output_dir(folder)
        finally:
            folder.chmod(0o755)


def test_resuming_with_other_loss_settings_is_refused(tmp_path):
    tiny_cusa_model(0, csa_weight=0.1, softlabel_temperature=1.0).save_pretrained(tmp_path / "checkpoint-2")
    for field, value in (("csa_weight", 0.3), ("softlabel_temperature", 0.5)):
        config = tiny_cusa_model(0, **{field: value}).config
        with pytest.raises(ValueError, match=f"{field}: checkpoint .*, this run {value}"):
            check_resumable(tmp_path / "checkpoint-2", config)
    check_resumable(tmp_path / "checkpoint-2", tiny_cusa_model(0).config)
