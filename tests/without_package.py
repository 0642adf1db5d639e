"""Running a script where cusa-hf cannot be imported: what a user without the package sees of a saved checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

#: Put first in a script: every import of cusa_hf fails, as where the package is not installed.
BLOCK_CUSA_HF = """
import sys
class BlockCusa:
    def find_spec(self, name, path=None, target=None):
        if name == "cusa_hf" or name.startswith("cusa_hf."):
            raise ImportError("cusa_hf is blocked in this test")
sys.meta_path.insert(0, BlockCusa())
"""


def run_without_cusa_hf(script: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh offline Python in ``folder`` (its own HF_HOME) with cusa_hf blocked."""
    env = {**os.environ, "HF_HOME": str(folder / "hf_home"), "HF_HUB_OFFLINE": "1"}
    code = BLOCK_CUSA_HF + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=folder)
