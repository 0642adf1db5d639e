"""Run a test function in two CPU processes (gloo) the way accelerate's ``debug_launcher`` does, but spawned.

``debug_launcher`` forks. Forking a process whose torch thread pools already run (any earlier test that did a matrix
product) can deadlock the child; in the full suite the children hung inside ``Module.to``. Spawned children start
clean. The function must be defined at module level of an importable module (tests/ is on ``sys.path``).
"""

from __future__ import annotations

import socket
import tempfile
from typing import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_launcher(function: Callable, args: tuple = (), num_processes: int = 2) -> None:
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with tempfile.NamedTemporaryFile() as rendezvous:
        with patch_environment(
            world_size=num_processes,
            master_addr="127.0.0.1",
            master_port=str(free_port()),
            accelerate_mixed_precision="no",
            accelerate_debug_rdv_file=rendezvous.name,
            accelerate_use_cpu="yes",
            gloo_socket_ifname="lo",
        ):
            start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=num_processes, start_method="spawn")
