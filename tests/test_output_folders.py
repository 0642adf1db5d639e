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
from two_process import call_in_another_process

from cusa_hf.checkpoints import LOCK_FILE, RUN_MANIFEST, check_resumable, claim_output_dir

def claim_and_release(folder: str) -> str:
    try:
        claim_output_dir(folder).release()
    except ValueError as error:
        return f"REFUSED {error}"
    return "CLAIMED"


def claim_elsewhere(folder) -> str:
    """What ``claim_output_dir(folder)`` says in another Python process."""
    return call_in_another_process(claim_and_release, str(folder))


def finished_run(folder: Path) -> Path:
    """What a finished run leaves: checkpoints, the model with its processor and card, results, written while the run
    held the folder, so that its manifest records them."""
    lock = claim_output_dir(folder)
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("model.safetensors", "config.json", "modeling_cusa.py", "losses.py", "README.md", "results.json",
                 "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "trainer_state.json"):
        (folder / name).write_text("x")  # fmt: skip
    lock.release()
    return folder


def names(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_overwrite_deletes_only_what_a_run_recorded_it_wrote(tmp_path):
    run = finished_run(tmp_path / "run")
    assert json.loads((run / RUN_MANIFEST).read_text())["entries"] == sorted(
        name for name in os.listdir(run) if name != RUN_MANIFEST
    )
    claim_output_dir(run, overwrite=True).release()
    assert not any(run.iterdir())

    # The same names, written by the user (no run recorded them), are never deleted, whatever they look like.
    mine = tmp_path / "mine"
    for name in ("optimizer_notes/ideas.txt", "runs/x", "README.md", "config.json", "checkpoint-1/notes.txt"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text("the user's own")
    before = names(mine)
    with pytest.raises(ValueError, match=r"holds what no run recorded \(README.md, checkpoint-1/, config.json, "
                                         r"optimizer_notes/, runs/\); nothing was deleted"):  # fmt: skip
        claim_output_dir(mine, overwrite=True)
    assert names(mine) == before

    # A run's folder to which the user added files afterwards: refused, naming only the user's files.
    finished_run(run)
    (run / "notes.txt").write_text("mine")
    (run / "optimizer_notes").mkdir()
    before = names(run)
    with pytest.raises(ValueError, match=r"no run recorded \(notes.txt, optimizer_notes/\)"):
        claim_output_dir(run, overwrite=True)
    assert names(run) == before


def test_a_run_records_a_checkpoint_before_saving_it_and_a_comparison_its_run_folders(tmp_path):
    from cusa_hf.checkpoints import record_run_outputs

    folder = tmp_path / "comparison"
    lock = claim_output_dir(folder)
    record_run_outputs(folder / "cusa", [folder / "cusa" / "checkpoint-3"])  # about to save cusa/checkpoint-3
    assert json.loads((folder / RUN_MANIFEST).read_text())["entries"] == ["cusa"]
    (folder / "baseline").mkdir()
    (folder / "results.json").write_text("{}")
    record_run_outputs(folder / "baseline")
    assert json.loads((folder / RUN_MANIFEST).read_text())["entries"] == ["baseline", "cusa", "results.json"]
    lock.release()
    # A resumed run keeps the earlier record and adds what it writes.
    lock = claim_output_dir(folder, resume_from_checkpoint="last")
    (folder / "all_results.json").write_text("{}")
    lock.release()
    assert json.loads((folder / RUN_MANIFEST).read_text())["entries"] == [
        "all_results.json", "baseline", "cusa", "results.json"
    ]  # fmt: skip


def test_no_input_of_a_run_is_ever_inside_the_folder_it_replaces(tmp_path):
    from transformers import CLIPModel

    from tiny_models import tiny_clip_config

    clip = tmp_path / "clip"
    CLIPModel(tiny_clip_config()).save_pretrained(clip)  # a pretrained folder: its file names look like a run's
    before = names(clip)
    with pytest.raises(ValueError, match=r"backbone='.*clip' is, or lies inside, output_dir='.*clip': .*Nothing was "
                                         r"touched"):  # fmt: skip
        claim_output_dir(clip, overwrite=True, inputs={"backbone": str(clip)})
    assert names(clip) == before and not (clip / LOCK_FILE).exists()
    comparison = tmp_path / "out"  # a comparison run's folder, recorded by its run
    lock = claim_output_dir(comparison)
    (comparison / "baseline").mkdir()
    (comparison / "baseline" / "model.safetensors").write_text("weights")
    (comparison / "results.json").write_text("{}")
    lock.release()
    with pytest.raises(ValueError, match=r"backbone='.*out/baseline' is, or lies inside, output_dir='.*out'"):
        inputs = {"backbone": str(comparison / "baseline"), "test_file": None}
        claim_output_dir(comparison, overwrite=True, inputs=inputs)
    assert (comparison / "baseline" / "model.safetensors").read_text() == "weights"


def test_a_live_run_beneath_or_above_a_folder_is_never_touched(tmp_path):
    outer = finished_run(tmp_path / "X")
    lock = claim_output_dir(outer, resume_from_checkpoint="last")
    (outer / "cusa").mkdir()
    lock.release()
    # Run A (another live process) holds X/cusa; run B overwrites X.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": sleeper.pid, "host": socket.gethostname(), "process_start": None, "created": 0}
        (outer / "cusa" / LOCK_FILE).write_text(json.dumps(record))
        before = names(outer)
        with pytest.raises(ValueError, match=rf"would delete a live run's folder: .*process {sleeper.pid}"):
            claim_output_dir(outer, overwrite=True)
        assert names(outer) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # A comparison holding X covers X/cusa and X/baseline against other runs.
    (outer / "cusa" / LOCK_FILE).unlink()
    lock = claim_output_dir(tmp_path / "Y")
    try:
        answer = claim_elsewhere(tmp_path / "Y" / "cusa")
        assert answer.startswith("REFUSED") and "lies inside a live run's output folder" in answer
        assert f"process {os.getpid()}" in answer
    finally:
        lock.release()
    assert claim_elsewhere(tmp_path / "Y" / "cusa") == "CLAIMED"


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
