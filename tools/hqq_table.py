#!/usr/bin/env python3
"""KLD of llama-quantize vs ggufq's methods, per type.

For each type, builds GGUFs with the same per-tensor types (pure types: every
matrix; mixtures such as Q4_K_M: read back from llama-quantize's own output) and
measures mean KLD against the F16 model's logits with llama-perplexity:

  llama-quantize            llama.cpp, no imatrix
  llama-quantize+imatrix    llama.cpp with --imatrix FILE
  hqq                       ggufq --method calibrated (alias hqq; text the model generates itself through llama.cpp)
  hqq-datafree              ggufq --method hqq --calib-tokens 0 (gamma^2 importance only)
  hqq-plain                 faithful HQQ written into the blocks
  (extra, --methods): refine, hqq-scaled, hqq+imatrix, hqq+imatrix*gamma, ggml+gamma

Prints a markdown table and writes a PNG of KLD vs bits/weight.

Example (tinyllama, 60 chunks of heldout):
  python -m tools.hqq_table --model fixtures/tinyllama-spm-10m \\
      --text ../shared/data/gcide-heldout/heldout.txt --chunks 60 \\
      --imatrix IMATRIX.gguf --work SCRATCH \\
      --types Q2_K Q3_K Q4_0 Q4_1 Q4_K Q5_0 Q5_K Q6_K Q4_K_M Q3_K_M Q2_K_MIX
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from ggufq.convert import prepare
from ggufq.importance import combine, importance_for
from ggufq.quant import hqq
from ggufq_ref import ggml_ref
from tools.common import child_env, ggufq_cmd, llama_bin, run

PURE = {t.name for t in (T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0)}
# llama-quantize ftype names; "Q2_K_MIX" = llama-quantize's Q2_K preset (a mixture), pure "Q2_K" = --pure
MIX = {"Q4_K_M": "Q4_K_M", "Q3_K_M": "Q3_K_M", "Q2_K_MIX": "Q2_K", "Q4_K_S": "Q4_K_S", "Q5_K_M": "Q5_K_M"}


def kld(binp, path, base, chunks, threads):
    # llama.cpp's background logger is not flushed at exit, so the report's tail can be lost
    # (less often into a file than a pipe): rerun until the figure is there
    import tempfile
    for _ in range(8):
        with tempfile.TemporaryFile("w+") as f:
            r = subprocess.run([str(c) for c in (binp / "llama-perplexity", "-m", path, "--kl-divergence-base", base,
                                                 "--kl-divergence", "--chunks", chunks, "-t", threads)],
                               stdout=f, stderr=subprocess.STDOUT)
            f.seek(0)
            s = f.read()
        if r.returncode:
            sys.exit(f"failed: llama-perplexity on {path}\n{s[-3000:]}")
        m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", s)
        if m:
            return float(m.group(1))
    sys.exit(f"llama-perplexity never printed its KLD report for {path}")


def tensor_types(path):
    r = gguf.GGUFReader(path)
    return {t.name: T(int(t.tensor_type)) for t in r.tensors}


def bpw(path, types):
    r = gguf.GGUFReader(path)
    nel = sum(int(np.prod(t.shape)) for t in r.tensors)
    nb = sum(int(t.n_bytes) for t in r.tensors)
    return 8.0 * nb / nel


_CALIB: dict = {}     # model -> SelfCalibration (seeded: the same sample and moments for every type)


def build(model, path, types, encoder, ims, label, calib_tokens=0, calib_seq=512, calib_seed=0, jobs=1,
          imatrix=None, damp=None):
    """The GGUF with llama-quantize's per-tensor ``types`` through convert's explicit-types seam,
    encoded by ``encoder`` with the importance ``ims``; with ``calib_tokens`` the matrices the
    self-calibration covers get its moments (one seeded calibration per model, shared by every type),
    and ``imatrix`` (the file) picks their block scales; ``damp``: GPTQ's damping."""
    from ggufq.convert import Options, convert
    t0 = time.monotonic()
    sc = None
    if calib_tokens:
        from ggufq import calib
        key = (model, calib_tokens, calib_seq, calib_seed)
        if key not in _CALIB:
            _CALIB[key] = calib.calibrate_folder(model, Path(path).parent, calib_tokens, seq_len=calib_seq,
                                                 seed=calib_seed, jobs=jobs, progress=False)
        sc = _CALIB[key]
    convert(model, path, options=Options(
        types=types, encoder=encoder, importance=ims, calibration=sc, method="calibrated" if sc else "kquant",
        imatrix=imatrix if sc is not None and label.endswith("imatrix") else None,
        force=True, progress=False, jobs=jobs, damp=damp))
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--text", required=True, help="evaluation text for llama-perplexity")
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="encoder processes and calibration threads for the ggufq rows")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K"])
    ap.add_argument("--methods", nargs="+",
                    default=["llama-quantize", "llama-quantize+imatrix", "hqq", "hqq-datafree", "hqq-plain"])
    ap.add_argument("--imatrix", help="llama.cpp imatrix (GGUF or .dat) for the +imatrix rows")
    ap.add_argument("--work", required=True, help="scratch folder for GGUFs and logits")
    ap.add_argument("--f16", help="F16 GGUF of the model (default: converted with ggufq into --work)")
    ap.add_argument("--base", help="base logits from llama-perplexity --kl-divergence-base (default: made in --work)")
    ap.add_argument("--llama-bin")
    ap.add_argument("--calib-tokens", type=int, default=32768,
                    help="self-calibration sample for hqq, hqq-max and hqq+imatrix (0: data-free)")
    ap.add_argument("--calib-seq", type=int, default=512, help="self-calibration sequence length")
    ap.add_argument("--calib-seed", type=int, default=0, help="self-calibration sampling seed")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ damping (fraction of the mean diagonal)")
    ap.add_argument("--png", help="plot path (default: WORK/hqq_kld.png)")
    ap.add_argument("--json", help="append results as JSON lines here (default: WORK/results.jsonl)")
    a = ap.parse_args()
    binp = llama_bin(a.llama_bin)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = Path(a.f16) if a.f16 else work / "f16.gguf"
    if not f16.exists():
        run(ggufq_cmd("convert", a.model, "-o", f16, "--type", "F16", "--force"), env=child_env())
    base = Path(a.base) if a.base else work / f"base{a.chunks}.kld"
    if not base.exists():
        run([binp / "llama-perplexity", "-m", f16, "-f", a.text, "--kl-divergence-base", base,
             "--chunks", a.chunks, "-t", a.threads])
    jl = Path(a.json) if a.json else work / "results.jsonl"

    p = prepare(a.model)
    with p.model:
        free = importance_for(p)
    real = {}
    if a.imatrix:
        from ggufq.imatrix import load
        im = load(a.imatrix)
        real = {t.name: im.for_tensor(t.name, t.row_len) for t in p.tensors if im.entries.get(t.name) is not None}

    rows = []
    for ty in a.types:
        lq_type = MIX.get(ty, ty)
        ref = work / f"lq-{ty}.gguf"
        extra = ["--pure"] if ty in PURE else []
        run([binp / "llama-quantize", *extra, f16, ref, lq_type, "2"])
        types = tensor_types(ref)
        res = {}
        for m in a.methods:
            out = work / f"{m}-{ty}.gguf"
            secs = None
            if m == "llama-quantize":
                out = ref
            elif m == "llama-quantize+imatrix":
                if not a.imatrix:
                    continue
                run([binp / "llama-quantize", *extra, "--imatrix", a.imatrix, f16, out, lq_type, "2"])
            else:
                calib_tokens = a.calib_tokens if m in ("hqq", "hqq-max", "hqq+imatrix") else 0
                enc, ims = {
                    "hqq": (hqq.encode_hqq, free),
                    "hqq-datafree": (hqq.encode_hqq, free),
                    "hqq-plain": (hqq.encode_hqq_plain, {}),
                    "hqq-fast": (hqq.encode_hqq_fast, free),
                    "hqq-max": (hqq.encode_hqq_max, free),
                    "hqq-scaled": (hqq.encode_hqq_scaled, {}),
                    "refine": (hqq.encode_refined, {}),
                    "refine+gamma": (hqq.encode_refined, free),
                    "ggml+gamma": (ggml_ref.quantize, free),
                    "ggml": (ggml_ref.quantize, {}),
                    "hqq+imatrix": (hqq.encode_hqq, real),
                    "hqq+imatrix*gamma": (hqq.encode_hqq, {k: combine(real.get(k), free.get(k), "product")
                                                           for k in set(real) | set(free)}),
                }[m]
                secs = build(a.model, out, types, enc, ims, m, calib_tokens, a.calib_seq, a.calib_seed, a.jobs,
                             imatrix=a.imatrix, damp=a.damp)
            k = kld(binp, out, base, a.chunks, a.threads)
            res[m] = k
            rec = dict(model=Path(a.model).name, type=ty, method=m, kld=k, bpw=bpw(out, types), build_s=secs)
            with open(jl, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"  {ty:8s} {m:24s} KLD {k:.5f}  bpw {rec['bpw']:.3f}" + (f"  build {secs:.1f}s" if secs else ""),
                  file=sys.stderr, flush=True)
        rows.append((ty, bpw(ref, types), res))

    ms = a.methods
    print("| type | bpw | " + " | ".join(ms) + " | hqq / llama-quantize |")
    print("|---|---|" + "---|" * (len(ms) + 1))
    for ty, b, res in rows:
        cells = [f"{res[m]:.4f}" if m in res else "-" for m in ms]
        ratio = f"{res['hqq'] / res['llama-quantize']:.3f}" if "hqq" in res and "llama-quantize" in res else "-"
        print(f"| {ty} | {b:.2f} | " + " | ".join(cells) + f" | {ratio} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in ms:
            pts = sorted((b, res[m], ty) for ty, b, res in rows if m in res)
            if pts:
                ax.plot([q[0] for q in pts], [q[1] for q in pts], "o-", label=m)
        for ty, b, res in rows:
            ax.annotate(ty, (b, max(res.values())), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"mean KLD vs F16 ({a.chunks}x512)")
        ax.set_title(Path(a.model).name)
        ax.legend()
        png = Path(a.png) if a.png else work / "hqq_kld.png"
        fig.savefig(png, dpi=120, bbox_inches="tight")
        print(f"plot: {png}", file=sys.stderr)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    finally:
        for sc in _CALIB.values():
            sc.close()
