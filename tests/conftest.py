from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tools.common import HELDOUT, LLAMA_BIN, ROOT, SHARED, SMOLLM2, TINY, WIKITEXT  # noqa: F401  -- the tests' paths


@pytest.fixture(scope="session")
def tiny() -> Path:
    return TINY


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A writable copy of the tiny model (shards hard-linked where possible -- a test that changes one
    must replace the file, not write into it; symlinks out of a model folder are refused)."""
    d = tmp_path / "tiny"
    d.mkdir()
    for f in TINY.iterdir():
        if f.suffix == ".safetensors":
            try:
                os.link(f, d / f.name)
            except OSError:
                shutil.copy(f, d / f.name)
        else:
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"smollm2-135m-dither not built at {SMOLLM2} (python -m tools.build_smollm2)")
    return SMOLLM2


def run_cli(*args: str, cwd=None):
    """Run the real CLI in a subprocess; returns CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ggufq", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
