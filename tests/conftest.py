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


def journaled(out: Path, more_than: int):
    """A ``ready`` for :func:`interrupt_when`: the ``--resume`` journal of ``out`` has more than ``more_than``
    lines (its header line and one per finished tensor)."""
    journal = out.parent / f".{out.name}.partial" / "journal.jsonl"
    return lambda: journal.exists() and len(journal.read_text().splitlines()) > more_than


def interrupt_when(p, ready, timeout: float = 120) -> str:
    """SIGINT the process ``p`` (stderr piped, text) once ``ready()`` holds, it has ended, or ``timeout``
    seconds passed; its stderr. A process still there 60 s after the signal is killed."""
    import signal
    import time
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and p.poll() is None and not ready():
            time.sleep(0.005)
        p.send_signal(signal.SIGINT)
        return p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_cli(*args: str, cwd=None):
    """Run the real CLI in a subprocess; returns CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ggufq", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
