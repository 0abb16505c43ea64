#!/usr/bin/env python3
"""Accuracy parity of ggufq's encoders with llama.cpp's own (ggml_quantize_chunk via ctypes).

For every 2-D tensor of MODEL_DIR (safetensors, bf16/f16/f32) and every type:
relative RMSE ||x - deq|| / ||x|| of ours and of ggml's, their ratio, and the
blocks whose bytes are identical. Types default to every quantized type ggufq
registers (``ggufq.quant.encoders()``); types ggml cannot quantize without an
imatrix (IQ2_XXS, IQ2_XS, IQ1_S) are compared with one only. Prints a markdown table.

    python -m tools.quant_parity fixtures/tinyllama-spm-10m
    python -m tools.quant_parity fixtures/tinyllama-spm-10m --types IQ4_XS,IQ4_NL --imatrix synthetic
"""
from __future__ import annotations

import argparse
import sys
import time


import numpy as np
from gguf import GGMLQuantizationType as T

from ggufq.quant import can_encode, encoders
from ggufq_ref import ggml_ref
from ggufq_ref.parity import compare, model_matrices, synthetic_imatrix


def registered_types() -> list[T]:
    """Every quantized type with a registered encoder (floats left out), in ggml's order."""
    return [t for t in sorted(encoders(), key=int) if t not in (T.F32, T.F16, T.BF16)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--types", default="", help="comma-separated ggml types (default: every registered quantized type)")
    ap.add_argument("--imatrix", choices=("none", "synthetic", "both"), default="both",
                    help="importance weights: none, a synthetic positive imatrix per column, or both (default)")
    ap.add_argument("--max-rows", type=int, default=0, help="use at most this many rows of each tensor (0: all)")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every block is identical")
    a = ap.parse_args(argv)
    types = [T[t.strip().upper()] for t in a.types.split(",") if t.strip()] or registered_types()
    modes = ["none", "synthetic"] if a.imatrix == "both" else [a.imatrix]
    mats = [(n, m[: a.max_rows] if a.max_rows else m) for n, m in model_matrices(a.model_dir)]
    print(f"{len(mats)} matrices, {sum(m.size for _, m in mats) / 1e6:.1f} M weights from {a.model_dir}\n")
    print("| type | imatrix | tensors | mean ratio | max ratio (tensor) | ours rel-RMSE | ggml rel-RMSE | identical blocks |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    all_same = True
    for qt in types:
        for mode in modes:
            if mode == "none" and ggml_ref.requires_imatrix(qt):
                print(f"| {qt.name} | none | - | - | - | - | - | (ggml needs an imatrix) |")
                continue
            t0 = time.time()
            ratios, ours, ref, same, nbl, argmax = [], [], [], 0.0, 0, ""
            for name, m in mats:
                if not can_encode(qt, m.shape[1]):
                    continue
                im = synthetic_imatrix(m.shape[1]) if mode == "synthetic" else None
                p = compare(qt, m, im)
                ratios.append(p.ratio)
                ours.append(p.ours)
                ref.append(p.ggml)
                same += p.same_blocks * p.n_blocks
                nbl += p.n_blocks
                if p.ratio > max(ratios[:-1], default=-1.0):
                    argmax = name
            if not ratios:
                continue
            worst = max(worst, max(ratios))
            same = int(round(same))
            all_same &= same == nbl
            print(f"| {qt.name} | {mode} | {len(ratios)} | {np.mean(ratios):.5f} | {max(ratios):.5f} ({argmax}) "
                  f"| {np.mean(ours):.5f} | {np.mean(ref):.5f} | {same}/{nbl} = {100 * same / nbl:.3f}% |", flush=True)
            print(f"{qt.name}/{mode}: {time.time() - t0:.1f}s", file=sys.stderr)
    print(f"\nall blocks identical: {'yes' if all_same else 'no'}")
    return 0 if all_same or not a.strict else 1


if __name__ == "__main__":
    sys.exit(main())
