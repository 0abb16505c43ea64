#!/usr/bin/env python3
"""Encoder speed: ggufq's NumPy encoders vs llama.cpp's C quantizers (ggml_quantize_chunk via ctypes).

Weights per second for each type, on one core and on all cores: ours splits row
ranges over a ProcessPoolExecutor, ggml's over threads (ctypes releases the GIL).
Types default to every quantized type ggufq registers (``ggufq.quant.encoders()``);
types ggml cannot quantize without an imatrix (IQ2_XXS, IQ2_XS, IQ1_S) are timed
with a synthetic one on both sides. Tensors: every matrix of MODEL_DIR
(safetensors) and/or a random 4096x4096 one. Prints a markdown table.

    python -m tools.bench_quant --model fixtures/tinyllama-spm-10m --random 4096
    python -m tools.bench_quant --random 2048 --jobs 0 --types IQ4_XS,IQ4_NL   # one core only
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path


import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ggufq.quant import encode, encoders
from ggufq_ref import ggml_ref
from ggufq_ref.parity import model_matrices, synthetic_imatrix


def registered_types() -> list[T]:
    """Every quantized type with a registered encoder (floats left out), in ggml's order."""
    return [t for t in sorted(encoders(), key=int) if t not in (T.F32, T.F16, T.BF16)]

CHUNK = 1 << 18          # weights per encode call, as a streaming converter would feed


def _ours(qt, m, im):
    rows = max(1, CHUNK // m.shape[1])
    for lo in range(0, m.shape[0], rows):
        encode(qt, m[lo:lo + rows], im)


def _ggml(qt, m, im):
    ggml_ref.quantize(qt, m, im)


def _split(m, parts):
    step = -(-m.shape[0] // parts)
    return [m[i:i + step] for i in range(0, m.shape[0], step)]


def _ours_task(args):
    qt, m, im = args
    _ours(T(qt), m, im)
    return m.size


def timed(fn, mats, qt, ims, pool=None, kind="ours", jobs=1):
    # one core: CPU time of this process (ggml runs in this thread), robust on a shared machine
    clock = time.process_time if pool is None else time.perf_counter
    t0 = clock()
    n = 0
    for m, im in zip(mats, ims):
        if pool is None:
            fn(qt, m, im)
        elif kind == "ours":
            list(pool.map(_ours_task, [(int(qt), part, im) for part in _split(m, jobs)]))
        else:
            list(pool.map(lambda part: _ggml(qt, part, im), _split(m, jobs)))
        n += m.size
    return n / (clock() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder whose matrices to encode (default: none)")
    ap.add_argument("--random", type=int, default=4096, help="also a random NxN matrix (0: none; default 4096)")
    ap.add_argument("--types", default="", help="comma-separated ggml types (default: every registered quantized type)")
    ap.add_argument("--imatrix", choices=("none", "synthetic"), default="none", help="importance weights")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="cores for the all-core columns (0: one core only, no all-core columns)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs (default 2)")
    a = ap.parse_args(argv)
    if not ggml_ref.available():
        print("llama-cpp-python (libggml-base) is not installed: no reference to compare with", file=sys.stderr)
        return 2
    sets = []
    if a.model:
        sets.append((f"{Path(a.model).name} (all matrices)", [m for _, m in model_matrices(a.model)]))
    if a.random:
        rng = np.random.default_rng(0)
        sets.append((f"random {a.random}x{a.random}",
                     [rng.standard_normal((a.random, a.random), dtype=np.float32) * np.float32(0.02)]))
    if not sets:
        ap.error("nothing to encode: give --model and/or --random N")
    types = [T[t.strip().upper()] for t in a.types.split(",") if t.strip()] or registered_types()
    jobs = max(1, a.jobs)
    multi = a.jobs > 0
    with ProcessPoolExecutor(jobs) as procs, ThreadPoolExecutor(jobs) as threads:
        if multi:
            list(procs.map(_ours_task, [(int(T.Q4_K), np.ones((1, 256), np.float32), None)] * jobs))   # warm workers
        print(f"imatrix: {a.imatrix}; all cores = {jobs if multi else '-'}; "
              f"Mw/s = million weights per second, best of {a.repeat}; {_load()} at the start\n")
        print("| tensors | type | imatrix | ours 1 core | ggml 1 core | ratio | ours all cores | ggml all cores | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, mats in sets:
            synth = [synthetic_imatrix(m.shape[1]) for m in mats]
            for qt in types:
                with_im = a.imatrix == "synthetic" or ggml_ref.requires_imatrix(qt)
                ims = synth if with_im else [None] * len(mats)
                mine = [m for m in mats if m.shape[1] % GGML_QUANT_SIZES[qt][0] == 0]
                ims = [im for m, im in zip(mats, ims) if m.shape[1] % GGML_QUANT_SIZES[qt][0] == 0]
                if not mine:
                    continue
                best = lambda *args, **kw: max(timed(*args, **kw) for _ in range(a.repeat))  # noqa: E731
                o1 = best(_ours, mine, qt, ims)
                g1 = best(_ggml, mine, qt, ims)
                row = f"| {label} | {qt.name} | {'synthetic' if with_im else 'none'} | {o1 / 1e6:.2f} | {g1 / 1e6:.2f} | {o1 / g1:.2f} "
                if multi:
                    oj = best(_ours, mine, qt, ims, procs, "ours", jobs)
                    gj = best(_ggml, mine, qt, ims, threads, "ggml", jobs)
                    row += f"| {oj / 1e6:.2f} | {gj / 1e6:.2f} | {oj / gj:.2f} |"
                else:
                    row += "| - | - | - |"
                print(row, flush=True)
    print(f"\n{_load()} at the end")
    return 0


def _load() -> str:
    """The machine's load average (the one-core columns are CPU time, but a loaded machine shares caches)."""
    try:
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


if __name__ == "__main__":
    sys.exit(main())
