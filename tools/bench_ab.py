#!/usr/bin/env python3
"""Encoder speed of this tree against another ggufq tree, in one process, with ggml's C alongside.

On a shared machine two separate ``bench_quant`` runs differ by 10-20% (one run's
ratio for unchanged code moved from 0.82 to 0.94); alternating the two trees'
encoders and ggml's in one process, round after round, and comparing CPU time
holds the relative figure to a few percent. The other tree (a checkout of the
commit to compare with, e.g. ``git worktree add /tmp/base COMMIT``) is imported
under another package name, so both encoders are timed on the same arrays; the
bytes of both must be equal. Prints a markdown table: M weights/s (best round),
the speed-up new/old (best round and median of rounds), and both ratios to ggml.

    python -m tools.bench_ab /tmp/base --types Q3_K,Q5_1,IQ1_M
    taskset -c 1 python -m tools.bench_ab /tmp/base --types Q4_0 --imatrix synthetic --rounds 15
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufq import quant as new_quant
from ggufq_ref import ggml_ref
from ggufq_ref.parity import synthetic_imatrix

CHUNK = 1 << 18          # weights per encode call, as tools/bench_quant.py feeds them


def load_other(tree: Path):
    """``ggufq.quant`` of the checkout at ``tree``, imported as package ``ggufq_ab_other``."""
    init = tree / "ggufq" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{tree}: no ggufq/__init__.py (give the root of a ggufq checkout)")
    spec = importlib.util.spec_from_file_location("ggufq_ab_other", init,
                                                  submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["ggufq_ab_other"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("ggufq_ab_other.quant")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", help="root of the other ggufq checkout (the 'old' column)")
    ap.add_argument("--types", required=True, help="comma-separated ggml types")
    ap.add_argument("--imatrix", choices=("none", "synthetic"), default="none", help="importance weights")
    ap.add_argument("--size", type=int, default=2048, help="a random NxN matrix (default 2048)")
    ap.add_argument("--rounds", type=int, default=8, help="alternated rounds (default 8)")
    a = ap.parse_args(argv)
    if not ggml_ref.available():
        print("llama-cpp-python (libggml-base) is not installed: no reference to compare with", file=sys.stderr)
        return 2
    old_quant = load_other(Path(a.other))
    rng = np.random.default_rng(0)
    m = rng.standard_normal((a.size, a.size), dtype=np.float32) * np.float32(0.02)
    rows = max(1, CHUNK // a.size)
    chunks = [m[lo:lo + rows] for lo in range(0, a.size, rows)]
    mw = m.size / 1e6
    print(f"random {a.size}x{a.size}, {a.rounds} alternated rounds, CPU time of this process\n")
    print("| type | imatrix | old Mw/s | new Mw/s | ggml Mw/s | new/old (best; median) | old / ggml | new / ggml |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.types.split(","):
        qt = T[name.strip().upper()]
        im = synthetic_imatrix(a.size) if a.imatrix == "synthetic" or ggml_ref.requires_imatrix(qt) else None

        def ours(q):
            t0 = time.process_time()
            for c in chunks:
                q.encode(qt, c, im)
            return time.process_time() - t0

        def ggml():
            t0 = time.process_time()
            ggml_ref.quantize(qt, m, im)
            return time.process_time() - t0

        if not np.array_equal(new_quant.encode(qt, chunks[0], im), old_quant.encode(qt, chunks[0], im)):
            print(f"{qt.name}: the two trees' bytes differ", file=sys.stderr)
            return 1
        to, tn, tg = [], [], []
        for _ in range(a.rounds):
            to.append(ours(old_quant))
            tn.append(ours(new_quant))
            tg.append(ggml())
        o, n, g = min(to), min(tn), min(tg)
        print(f"| {qt.name} | {'synthetic' if im is not None else 'none'} | {mw / o:.2f} | {mw / n:.2f} | {mw / g:.2f} "
              f"| {o / n:.2f}; {np.median(to) / np.median(tn):.2f} | {g / o:.2f} | {g / n:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
