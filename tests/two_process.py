"""Run a test function in two CPU processes (gloo) the way accelerate's ``debug_launcher`` does, but from a fork server.

``debug_launcher`` forks the test process. Forking a process whose torch thread pools already run (any earlier test
that did a matrix product) can deadlock the child; in the full suite the children hung inside ``Module.to``. Spawned
children start clean but spend most of their time importing torch, transformers and cusa_hf again (about 7 s of CPU
each). Children forked from a fork server start as clean (the server never computed) with those imports already done:
the server imports them once per test process. The function must be defined at module level of an importable module
(tests/ is on ``sys.path``).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import tempfile
from typing import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What the fork server imports once, so that each child does not.
PRELOADED_MODULES = ["torch", "torch.distributed", "accelerate", "transformers", "cusa_hf", "tiny_models"]


def _in_environment(environment: dict[str, str], function: Callable, *args):
    # A fork server's child inherits the server's environment from when it started: give it the caller's of now.
    os.environ.clear()
    os.environ.update(environment)
    return function(*args)


def _fork_server() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)
    return context


def call_in_another_process(function: Callable, *args):
    """``function(*args)`` in another process (a child of the fork server, with this process's environment); returns
    its result."""
    with _fork_server().Pool(1) as pool:
        return pool.apply(functools.partial(_in_environment, dict(os.environ), function), args)


def start_processes(function: Callable, args: tuple = (), num_processes: int = 2) -> None:
    """``torch.multiprocessing.start_processes(function, args, num_processes)`` (``function(index, *args)`` in each
    child, joined) with children forked from a fork server that has imported ``PRELOADED_MODULES``."""
    from torch.multiprocessing import start_processes as torch_start_processes

    _fork_server()
    torch_start_processes(functools.partial(_in_environment, dict(os.environ), function), args=args,
                          nprocs=num_processes, start_method="forkserver")  # fmt: skip


def _run_then_leave_the_group(function: Callable, *args) -> None:
    """Run ``function``, then leave the process group together: a child that exits with gloo's threads still running
    aborts ("terminate called without an active exception", SIGABRT), which failed a CI run after the test passed."""
    import torch.distributed as dist

    function(*args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn_launcher(function: Callable, args: tuple = (), num_processes: int = 2) -> None:
    from accelerate.utils import PrepareForLaunch, patch_environment

    # A folder, not a file: the file store deletes its file when the last process leaves the group.
    with tempfile.TemporaryDirectory() as rendezvous_dir:
        with patch_environment(
            world_size=num_processes,
            master_addr="127.0.0.1",
            master_port=str(free_port()),
            accelerate_mixed_precision="no",
            accelerate_debug_rdv_file=os.path.join(rendezvous_dir, "rendezvous"),
            accelerate_use_cpu="yes",
            gloo_socket_ifname="lo",
        ):
            launch = PrepareForLaunch(functools.partial(_run_then_leave_the_group, function), debug=True)
            start_processes(launch, args=args, num_processes=num_processes)
