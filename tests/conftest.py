import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKER_THREADS = None
if "PYTEST_XDIST_WORKER" in os.environ:
    import torch

    # pytest.ini runs the suite in pytest-xdist workers, each a process of its own: each computes on its share of the
    # cores, since two workers with a thread per core each fight over the cores instead of sharing them.
    WORKER_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(WORKER_THREADS)


@pytest.fixture(autouse=True)
def worker_threads():
    """Give the worker its share of the cores back after each test: the scripts a test calls in-process
    (``run_cusa.main``, the benchmarks) set torch to every core, and every later test of the worker would otherwise
    spin two threads per worker on two cores (five times the CPU time of the SGR/SAF coco_mini test)."""
    yield
    if WORKER_THREADS is not None:
        import torch

        torch.set_num_threads(WORKER_THREADS)

REPO_ROOT = Path(__file__).resolve().parent.parent


def coco_mini_path() -> Path | None:
    candidate = Path(os.environ.get("CUSA_COCO_MINI", REPO_ROOT.parent / "shared" / "data" / "coco_mini"))
    return candidate if (candidate / "train.json").exists() else None


@pytest.fixture
def coco_mini() -> Path:
    path = coco_mini_path()
    if path is None:
        pytest.skip("coco_mini not found at ../shared/data/coco_mini; set CUSA_COCO_MINI to its folder to run this test")
    return path


def pytest_collection_modifyitems(items):
    """Files with a test marked slow first, the others after them in their order: pytest.ini hands whole files to the
    workers in this order, and a long file handed out last would leave one worker running it alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
