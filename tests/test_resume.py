"""`ggufq convert --resume`: an interrupted conversion continues after its last verified tensor and
gives the bytes of an uninterrupted run; nothing of the partial file is trusted blindly (ggufq.resume)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, interrupt_when, journaled, run_cli


def _interrupted(out: Path, ftype: str = "Q4_K_M", after: int = 10, extra=()) -> list[dict]:
    """Start a --resume conversion, SIGINT it once ``after`` tensors are journaled; the journal's lines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "ggufq", "convert", str(TINY), "-t", ftype, "-o", str(out),
                          "-j", "1", "--resume", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    journal = out.parent / f".{out.name}.partial" / "journal.jsonl"
    err = interrupt_when(p, journaled(out, after))
    assert p.returncode == 130, err
    assert not out.exists()
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert lines[0]["tensors"] == 75 and len(lines) > after
    return lines[1:]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("full") / "full.gguf"
    r = run_cli("convert", TINY, "-t", "Q4_K_M", "-o", out, "-j", "1", "-q")
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def test_resume_continues_byte_identical(tmp_path, full):
    out = tmp_path / "m.gguf"
    done = _interrupted(out)
    r = run_cli("convert", TINY, "-t", "Q4_K_M", "-o", out, "-j", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} of 75 tensors verified (sha256) and kept" in r.stderr
    assert out.read_bytes() == full
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]            # the partial folder is gone


def test_resume_checks_every_kept_tensor(tmp_path, full):
    """A byte changed in the partial file's 4th tensor: the first 3 are kept, the rest encoded again."""
    out = tmp_path / "m.gguf"
    done = _interrupted(out)
    part = tmp_path / ".m.gguf.partial" / "m.gguf"
    e = done[3]
    with open(part, "r+b") as f:
        f.seek(e["offset"] + e["nbytes"] // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x5A]))
    r = run_cli("convert", TINY, "-t", "Q4_K_M", "-o", out, "-j", "1", "--resume")
    assert r.returncode == 0, r.stderr
    assert "3 of 75 tensors verified (sha256) and kept" in r.stderr
    assert out.read_bytes() == full


def test_resume_other_plan_starts_over(tmp_path):
    """The partial file of a Q4_K_M run is not used for a Q8_0 one (the header differs)."""
    out = tmp_path / "m.gguf"
    _interrupted(out)
    r = run_cli("convert", TINY, "-t", "Q8_0", "-o", out, "-j", "1", "--resume")
    assert r.returncode == 0, r.stderr
    assert "does not match this conversion" in r.stderr and "started over" in r.stderr
    ref = tmp_path / "ref.gguf"
    assert run_cli("convert", TINY, "-t", "Q8_0", "-o", ref, "-j", "1", "-q").returncode == 0
    assert out.read_bytes() == ref.read_bytes()


def test_resume_refuses_split(tmp_path):
    r = run_cli("convert", TINY, "-t", "Q8_0", "-o", tmp_path / "m.gguf", "--resume", "--split-max-tensors", "20")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["ggufq: error: --resume writes one file: leave out --split-max-size/"
                                             "--split-max-tensors (llama-gguf-split can split the result)"]
    assert os.listdir(tmp_path) == []
