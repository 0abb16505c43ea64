"""Peak memory stays flat: a conversion never holds a whole tensor, let alone the model."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from synth import make_model

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mib(args) -> float:
    code = ("import resource, runpy, sys; sys.argv = ['ggufq'] + sys.argv[1:];\n"
            "try:\n    runpy.run_module('ggufq', run_name='__main__')\n"
            "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kib = int(r.stderr.strip().splitlines()[-1].split()[1])
    return kib / 1024


def test_peak_rss_flat_with_tensor_size(tmp_path):
    # the same architecture with a small and a 16x larger embedding (8 MiB vs 128 MiB as F32 rows)
    small = make_model(tmp_path / "s", hidden=256, layers=1, ff=512, vocab=8192, dtype="BF16", tied=True)
    big = make_model(tmp_path / "b", hidden=1024, layers=1, ff=512, heads=8, kv_heads=8, vocab=32768,
                     dtype="BF16", tied=True)
    cfg_big = (big / "config.json").read_text()
    assert '"vocab_size": 32768' in cfg_big
    a = _peak_rss_mib(["convert", small, "-o", tmp_path / "s.gguf", "--type", "F32", "-j", "1", "-q"])
    b = _peak_rss_mib(["convert", big, "-o", tmp_path / "b.gguf", "--type", "F32", "-j", "1", "-q"])
    big_bytes = (tmp_path / "b.gguf").stat().st_size / 2**20
    assert big_bytes > 128
    # one chunk is 16 MiB of float32; a whole-tensor read would add >= 128 MiB
    assert b - a < 64, (a, b)
