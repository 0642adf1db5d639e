"""A bare ``accelerate launch`` on a machine without a GPU computes on every core (accelerate's default is one thread),
and a thread count the user chose is kept (cusa_hf.cpu_threads)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import psutil
import pytest
import torch

from cusa_hf import cpu_threads
from cusa_hf.cpu_threads import available_cores, use_every_cpu_core


@pytest.fixture
def launched_by_accelerate(monkeypatch):
    """This process as ``accelerate launch`` starts it by default, on a 3-core machine; torch's thread count is
    restored afterwards. Returns a setter for what the launcher's command line and environment were."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(cpu_threads, "available_cores", lambda: 3)
    torch.set_num_threads(1)

    def launcher(command_line=("accelerate", "launch", "examples/run_cusa.py"), environment=None):
        monkeypatch.setattr(cpu_threads, "_launcher_settings", lambda: (list(command_line), dict(environment or {})))

    launcher()
    yield launcher
    torch.set_num_threads(threads)


def test_the_only_process_of_a_cpu_run_gets_every_core_and_says_why(launched_by_accelerate, caplog):
    with caplog.at_level(logging.INFO, logger="cusa_hf.cpu_threads"):
        assert use_every_cpu_core("cpu", 1) == 3
    assert torch.get_num_threads() == 3
    assert "computing on all 3 CPU cores: accelerate launch set OMP_NUM_THREADS=1" in caplog.text
    assert "--num_cpu_threads_per_process N" in caplog.text


@pytest.mark.parametrize(
    "command_line,environment,reason",
    [
        (["accelerate", "launch", "--num_cpu_threads_per_process", "1", "run.py"], {}, "was given --num_cpu_threads_per_process"),
        (["accelerate", "launch", "--num_cpu_threads_per_process=1", "run.py"], {}, "was given --num_cpu_threads_per_process"),
        (["accelerate", "launch", "run.py"], {"OMP_NUM_THREADS": "1"}, "ran with OMP_NUM_THREADS=1"),
    ],
)
def test_one_thread_the_user_asked_for_is_kept(launched_by_accelerate, caplog, command_line, environment, reason):
    launched_by_accelerate(command_line, environment)
    with caplog.at_level(logging.INFO, logger="cusa_hf.cpu_threads"):
        assert use_every_cpu_core("cpu", 1) is None
    assert torch.get_num_threads() == 1
    assert f"computing on 1 CPU thread of 3, as asked: accelerate launch {reason}" in caplog.text


def test_a_launcher_that_cannot_be_read_keeps_one_thread(launched_by_accelerate, monkeypatch, caplog):
    def unreadable():
        raise psutil.AccessDenied(1)

    monkeypatch.setattr(cpu_threads, "_launcher_settings", unreadable)
    with caplog.at_level(logging.INFO, logger="cusa_hf.cpu_threads"):
        assert use_every_cpu_core("cpu", 1) is None
    assert torch.get_num_threads() == 1 and "the launcher's settings could not be read" in caplog.text


@pytest.mark.parametrize(
    "device,num_processes,environment",
    [
        ("cuda", 1, {}),  # one process per GPU: accelerate's one thread is right
        ("cpu", 2, {}),  # several CPU processes share the cores
        ("cpu", 1, {"OMP_NUM_THREADS": "2"}),  # a count above one is the user's (or accelerate's --cpu choice)
        ("cpu", 1, {"ACCELERATE_USE_CPU": None}),  # python run_cusa.py: torch's default or the user's OMP_NUM_THREADS
    ],
)
def test_other_runs_keep_their_thread_count(launched_by_accelerate, monkeypatch, device, num_processes, environment):
    for name, value in environment.items():
        monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
    assert use_every_cpu_core(device, num_processes) is None
    assert torch.get_num_threads() == 1


# The module is loaded from its file, without the package's __init__ (which imports all of transformers and datasets
# and would make each launch several times slower); it imports only torch and psutil.
LAUNCHED = """
import importlib.util
import torch
spec = importlib.util.spec_from_file_location("cpu_threads", {path!r})
cpu_threads = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_threads)
cpu_threads.use_every_cpu_core("cpu", 1)
print("THREADS", torch.get_num_threads())
"""


def test_under_a_real_accelerate_launch(tmp_path):
    """``accelerate launch`` on a machine without a GPU (none visible, no accelerate config file): bare, it gives the
    script one thread, which becomes every core; given one thread by flag or environment, the script keeps it. The
    three launches run at once (each spends most of its time importing)."""
    if available_cores() == 1:
        pytest.skip("one core: nothing to choose")
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED.format(path=cpu_threads.__file__))
    base = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    base.update(CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf_home"))
    launches = {  # name: (flags, environment, threads expected)
        "bare": ([], {}, available_cores()),
        "flag": (["--num_cpu_threads_per_process", "1"], {}, 1),
        "environment": ([], {"OMP_NUM_THREADS": "1"}, 1),
    }
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *flags, str(script)],
                               env={**base, **environment}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (flags, environment, _) in launches.items()
    }  # fmt: skip
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
        threads = int(stdout.split("THREADS ", 1)[1].split()[0])
        assert threads == launches[name][2], f"{name}: {stderr[-3000:]}"


@pytest.mark.parametrize("value", ["abc", "0", "-2", ""])
def test_a_thread_count_that_is_no_count_is_named(launched_by_accelerate, monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=rf"variable OMP_NUM_THREADS={value!r} is not a positive whole"):
            use_every_cpu_core(device, 1)
