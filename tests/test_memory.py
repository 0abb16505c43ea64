"""Peak memory stays flat: a conversion never holds a whole tensor, let alone the model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from synth import make_model

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mib(args) -> float:
    # VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's across exec)
    code = ("import runpy, sys; sys.argv = ['ggufq'] + sys.argv[1:];\n"
            "try:\n    runpy.run_module('ggufq', run_name='__main__')\n"
            "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "    print('PEAK', hwm, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kib = int(r.stderr.strip().splitlines()[-1].split()[1])
    return kib / 1024


def test_peak_rss_flat_with_tensor_size(tmp_path):
    # the same architecture with a 64 MiB and a 4x larger 256 MiB embedding (as F32); both span
    # several 16 MiB chunks, so a converter that streams peaks at the same RSS for both
    mid = make_model(tmp_path / "m", hidden=1024, layers=1, ff=512, heads=8, kv_heads=8, vocab=16384,
                     dtype="BF16", tied=True)
    big = make_model(tmp_path / "b", hidden=1024, layers=1, ff=512, heads=8, kv_heads=8, vocab=65536,
                     dtype="BF16", tied=True)
    a = _peak_rss_mib(["convert", mid, "-o", tmp_path / "m.gguf", "--type", "F32", "-j", "1", "-q"])
    b = _peak_rss_mib(["convert", big, "-o", tmp_path / "b.gguf", "--type", "F32", "-j", "1", "-q"])
    assert (tmp_path / "b.gguf").stat().st_size > 256 * 2**20
    # holding the big embedding whole would add >= 192 MiB over the mid model
    assert b - a < 24, (a, b)
    assert b < 256, b
