#!/usr/bin/env python3
"""i-quant encoders vs ggml: byte parity and single-core CPU time, per type, on every matrix of a model.

For each type, every 2-D tensor of MODEL_DIR (optionally only its first --rows rows) is encoded
by ggufq and by ggml_quantize_chunk (llama-cpp-python's libggml, through ctypes), with the
imatrix variants asked for: ``none`` (where ggml accepts none), ``synthetic`` (random
activations, ggufq_ref.parity.synthetic_imatrix). Times are process CPU seconds, so a busy
machine does not skew the ratio; both sides are warmed first (grid tables, ggml_quantize_init).
Prints a markdown table.

    python -m tools.bench_iq fixtures/tinyllama-spm-10m --types IQ2_XXS,IQ1_M
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ggufq.quant import can_encode, encode
from ggufq_ref import ggml_ref
from ggufq_ref.parity import model_matrices, synthetic_imatrix

DEFAULT_TYPES = "IQ2_XXS,IQ2_XS,IQ2_S,IQ1_S,IQ1_M"
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}          # ggml_quantize_requires_imatrix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder (safetensors)")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated ggml types (default {DEFAULT_TYPES})")
    ap.add_argument("--imatrix", default="none,synthetic", help="variants: none,synthetic (default both)")
    ap.add_argument("--rows", type=int, default=0, help="only the first N rows of each matrix (0: all)")
    a = ap.parse_args(argv)
    if not ggml_ref.available():
        print("llama-cpp-python (libggml-base) is not installed: no reference to compare with", file=sys.stderr)
        return 2
    mats = [(n, m[:a.rows] if a.rows else m) for n, m in model_matrices(a.model)
            if can_encode(T.IQ2_XXS, m.shape[1])]   # rows of whole 256-blocks (others take other types)
    print(f"{Path(a.model).name}: {len(mats)} matrices with rows of whole 256-blocks, "
          f"{sum(m.size for _, m in mats) / 1e6:.2f}M weights"
          f"{f' (first {a.rows} rows each)' if a.rows else ''}; CPU seconds, one core\n")
    print("| type | imatrix | identical blocks | ours s | ggml s | speed vs ggml |")
    print("|---|---|---|---|---|---|")
    for qt in (T[t.strip().upper()] for t in a.types.split(",") if t.strip()):
        bs = GGML_QUANT_SIZES[qt][1]
        for variant in a.imatrix.split(","):
            if variant == "none" and qt in NEEDS_IMATRIX:
                continue
            warm = np.ones((1, 256), np.float32)
            encode(qt, warm, np.ones(256, np.float32))
            ggml_ref.quantize(qt, warm, np.ones(256, np.float32))
            same = total = 0
            t_ours = t_ggml = 0.0
            for _, m in mats:
                im = synthetic_imatrix(m.shape[1]) if variant == "synthetic" else None
                t0 = time.process_time()
                ours = encode(qt, m, im)
                t1 = time.process_time()
                ref = ggml_ref.quantize(qt, m, im)
                t2 = time.process_time()
                t_ours += t1 - t0
                t_ggml += t2 - t1
                eq = (ours.reshape(-1, bs) == ref.reshape(-1, bs)).all(axis=1)
                same += int(eq.sum())
                total += eq.size
            print(f"| {qt.name} | {variant} | {same}/{total} | {t_ours:.2f} | {t_ggml:.2f} | "
                  f"{t_ggml / t_ours:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
