import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
