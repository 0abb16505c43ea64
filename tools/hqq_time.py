#!/usr/bin/env python3
"""Conversion time of one model with each encoder (same per-tensor types), single process.

  python -m tools.hqq_time --model fixtures/tinyllama-spm-10m --type Q4_K --work /tmp/x
Encoders: kquant (ggufq.quant.encode when the type is registered, else ggml's C
quantizer through ctypes -- say which), hqq, hqq-plain.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from gguf import GGMLQuantizationType as T

from ggufq.convert import prepare
from ggufq.importance import importance_for
from ggufq.quant import encoders, hqq
from ggufq_ref import ggml_ref

from tools.hqq_table import build


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    qt = T[a.type]
    p = prepare(a.model)
    types = {t.name: (qt if len(t.shape) == 2 else T.F32) for t in p.tensors}
    t0 = time.monotonic()
    with p.model:
        imp = importance_for(p)
    t_imp = time.monotonic() - t0
    numpy_kq = qt in encoders()
    kq = (lambda q, r, i: encoders()[q](r, i)) if numpy_kq else ggml_ref.quantize
    Path(a.work).mkdir(parents=True, exist_ok=True)
    res = {}
    for name, enc, ims in (("kquant", kq, {}), ("hqq", hqq.encode_hqq, imp), ("hqq-max", hqq.encode_hqq_max, imp), ("hqq-plain", hqq.encode_hqq_plain, {})):
        res[name] = build(a.model, Path(a.work) / f"t-{name}.gguf", types, enc, ims, name)
    print(f"| {a.type} | kquant ({'ggufq NumPy' if numpy_kq else 'ggml C via ctypes'}) | hqq | hqq-max | hqq-plain | importance |")
    print("|---|---|---|---|---|---|")
    print(f"| seconds | {res['kquant']:.1f} | {res['hqq']:.1f} | {res['hqq-max']:.1f} | {res['hqq-plain']:.1f} | {t_imp:.2f} |")


if __name__ == "__main__":
    main()
