#!/usr/bin/env python3
"""Weight-space error of the block encoders (no llama.cpp run needed), and the HQQ beta study.

  python -m tools.hqq_mse --model fixtures/tinyllama-spm-10m --layer 3
Part 1: sum of squared error over one layer's matrices, relative to ggml's own
quantizer (no imatrix), for every block type and encoder.
Part 2: HQQ's affine solver with its default beta vs beta = c * e0^(p-2): mean |e|,
MSE, iterations run, and the fraction of errors the first shrink sets to zero.
"""
from __future__ import annotations

import argparse
import time


import gguf
import numpy as np

from ggufq.convert import prepare
from ggufq.quant import hqq, layout
from ggufq_ref import ggml_ref


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=[t.name for t in layout.TYPES])
    a = ap.parse_args()
    p = prepare(a.model)
    with p.model:
        ts = [t.read(0, t.n_rows) for t in p.tensors if t.name.startswith(f"blk.{a.layer}.") and len(t.shape) == 2]
    encs = {"ggml": ggml_ref.quantize, "hqq-plain": hqq.encode_hqq_plain, "hqq-scaled": hqq.encode_hqq_scaled,
            "refine": hqq.encode_refined, "hqq-fast": hqq.encode_hqq_fast, "hqq-max": hqq.encode_hqq_max, "hqq": hqq.encode_hqq}
    print("| type | " + " | ".join(encs) + " |")
    print("|---|" + "---|" * len(encs))
    for name in a.types:
        qt = gguf.GGMLQuantizationType[name]
        res = {}
        for en, e in encs.items():
            tot, secs = 0.0, 0.0
            for x in ts:
                t0 = time.monotonic()
                b = e(qt, x, None)
                secs += time.monotonic() - t0
                tot += float(((x - gguf.quants.dequantize(b, qt).reshape(x.shape)) ** 2).sum())
            res[en] = (tot, secs)
        g = res["ggml"][0]
        print(f"| {name} | " + " | ".join(f"{v[0] / g:.3f} ({v[1]:.1f}s)" for v in res.values()) + " |")

    print("\n| bits / group | solver | mean abs err | MSE | iterations | zeroed by 1st shrink |")
    print("|---|---|---|---|---|---|")
    for bits, L in ((4, 32), (2, 16), (4, 64)):
        G = np.concatenate([x.reshape(-1, L) for x in ts])
        qmax = (1 << bits) - 1
        s0, z0, _ = hqq.solve_affine(G, bits, None, hqq.HqqParams(iters=1))
        e0 = G - (np.clip(np.rint(G * s0[:, None] + z0[:, None]), 0, qmax) - z0[:, None]) / s0[:, None]
        cfgs = [("min-max", hqq.HqqParams(iters=1)), ("HQQ p=0.7 beta=10", hqq.DEFAULT)] + \
               [(f"beta=c*e0^(p-2), c={c}", hqq.HqqParams(beta_scale=c)) for c in (0.3, 1, 3, 10)]
        for name, prm in cfgs:
            s, z, info = hqq.solve_affine(G, bits, None, prm)
            e = G - (np.clip(np.rint(G * s[:, None] + z[:, None]), 0, qmax) - z[:, None]) / s[:, None]
            beta = np.full(len(G), prm.beta) if prm.beta_scale is None else prm.beta_scale * np.abs(e0).mean(1) ** (prm.p - 2)
            zeroed = float((hqq.shrink_lp(e0, beta[:, None].astype(np.float32), prm.p) == 0).mean())
            print(f"| {bits} / {L} | {name} | {np.abs(e).mean():.6f} | {np.mean(e * e):.4e} | "
                  f"{len(info['mean_abs_err'])} | {zeroed:.3f} |")


if __name__ == "__main__":
    main()
