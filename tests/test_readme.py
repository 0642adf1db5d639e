"""Every ```python block of README.md runs as written, offline, on coco_mini found through ``$CUSA_COCO_MINI``, unless
its first line is ``# needs the Hugging Face Hub`` (those must still be valid Python). The blocks run in README order
in one fresh interpreter, as a notebook's cells would, each with a namespace of its own (so each needs its own
imports), in one temporary working directory: a block may read what an earlier one wrote (as a reader following the
README would), and nothing is written into the repository. ``$CUSA_COCO_MINI`` points them at
coco_mini with its test split cut to 40 images: the blocks that embed every test image run as written in a fifth of
the time."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_MARK = "# needs the Hugging Face Hub"
# Runs the JSON list of blocks on stdin, each in a namespace of its own; exits with the number of the first that fails.
RUN_BLOCKS = """
import json, sys, traceback
for number, block in enumerate(json.load(sys.stdin), start=1):
    try:
        exec(compile(block, f"<README.md offline python block {number}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(number)
"""


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def offline_blocks() -> list[str]:
    return [block for block in python_blocks() if not block.startswith(HUB_MARK + "\n")]


def test_every_python_block_of_the_readme_is_python_and_most_run_offline():
    for number, block in enumerate(python_blocks(), start=1):
        ast.parse(block, filename=f"README.md python block {number}")
    assert len(offline_blocks()) >= 3, "the README's offline examples are gone"


@pytest.mark.slow
def test_the_readme_python_blocks_run_as_written(coco_mini, tmp_path):
    reader_coco_mini = tmp_path / "coco_mini"
    reader_coco_mini.mkdir()
    (reader_coco_mini / "train.json").symlink_to(coco_mini / "train.json")
    (reader_coco_mini / "images").symlink_to(coco_mini / "images")
    test_records = json.loads((coco_mini / "test.json").read_text())
    kept_images = set(list(dict.fromkeys(record["image_id"] for record in test_records))[:40])
    (reader_coco_mini / "test.json").write_text(json.dumps([r for r in test_records if r["image_id"] in kept_images]))
    workdir = tmp_path / "reader"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # Fresh datasets and remote-code caches: the blocks compute what a new user's first run computes.
    env.update(CUSA_COCO_MINI=str(reader_coco_mini), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_MODULES_CACHE=str(tmp_path / "modules"))  # fmt: skip
    blocks = offline_blocks()
    result = subprocess.run([sys.executable, "-c", RUN_BLOCKS], input=json.dumps(blocks), cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=1200)  # fmt: skip
    failed = blocks[result.returncode - 1] if 0 < result.returncode <= len(blocks) else "(none: the interpreter failed)"
    assert result.returncode == 0, f"offline README python block {result.returncode}:\n{failed}\n{result.stderr[-4000:]}"
