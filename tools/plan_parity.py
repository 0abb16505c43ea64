#!/usr/bin/env python3
"""Plan parity with llama-quantize: for each model and --type, quantize an F16 GGUF
with llama.cpp's llama-quantize and compare every tensor's type (and the total
tensor bytes) with what ``ggufq.plan.make_plan`` plans for the same tensors.

    python -m tools.plan_parity                      # tinyllama (+ smollm2 when built), all types
    python -m tools.plan_parity --types Q4_K_M Q4_0 --models /path/to/hf_model
    python -m tools.plan_parity --types IQ4_XS IQ2_M --imatrix both

With ``--imatrix synthetic`` (or ``both``) llama-quantize also gets an importance
matrix (a GGUF imatrix written here for every matrix but token_embd) and the plan
is made with ``has_imatrix``; a --type that needs one is run without it only to
check that llama-quantize refuses exactly when ``Plan.needs_imatrix()`` says so.
Before the real files, two tables need no llama-quantize: bits per weight of
Llama-3.1-8B's tensors against llama.cpp's published figures, and every tensor's
type against llama.cpp's own ``llama_quant_compute_types`` (``ggufq_ref.llama_ref``)
for synthetic architectures (GQA, 70B, MoE, Falcon, MLA, odd rows).

The F16 GGUF comes from llama.cpp's convert_hf_to_gguf.py (``--converter llama.cpp``,
the default; needs torch) or from ``ggufq convert`` (``--converter ggufq``), and is
cached in --scratch. The tensor list given to the plan is read from that F16 GGUF
(``--specs gguf``) or from ``ggufq.convert.tensor_specs(model_dir)`` (``--specs ggufq``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import math
from typing import Optional

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T


from ggufq.plan import ModelInfo, TensorSpec, make_plan, specs_from_gguf
from ggufq.plan.gguf_header import read_header
from ggufq.plan.rules import FTYPES as R_FTYPES
from tools.common import LLAMA_BIN, LLAMA_CPP, ROOT, SMOLLM2, TINY, scratch

HERE = ROOT / "tools"

DEFAULT_BIN = LLAMA_BIN
DEFAULT_MODELS = [TINY, SMOLLM2]
K_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
           "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"]
IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
            "IQ4_NL", "IQ4_XS", "Q2_K_S", "TQ1_0", "TQ2_0", "MXFP4_MOE"]
ALL_TYPES = K_TYPES + IQ_TYPES


# llama.cpp's tools/quantize/README.md, Meta-Llama-3.1-8B, "bits/weight"
PUBLISHED_BPW = {"Q2_K": 3.1593, "Q3_K_S": 3.6429, "Q3_K_M": 3.9960, "Q3_K_L": 4.2979, "Q4_K_S": 4.6672,
                 "Q4_K_M": 4.8944, "Q5_K_S": 5.5704, "Q5_K_M": 5.7036, "Q6_K": 6.5633, "Q8_0": 8.5008,
                 "F16": 16.0005,
                 "IQ1_S": 2.0042, "IQ1_M": 2.1460, "IQ2_XXS": 2.3824, "IQ2_XS": 2.5882, "IQ2_S": 2.7403,
                 "IQ2_M": 2.9294, "IQ3_XXS": 3.2548, "IQ3_XS": 3.4977, "IQ3_S": 3.6606, "IQ3_M": 3.7628,
                 "IQ4_XS": 4.4597, "IQ4_NL": 4.6818, "Q2_K_S": 2.9697}
# the figures that depend on an imatrix: IQ3_XXS's is the mixture with one (attn_v IQ3_XXS, ffn_down
# IQ3_XXS), IQ4_XS/IQ4_NL's the mixture without (ffn_down of layers 0-3 in Q5_K); the rest are the same
PUBLISHED_WITH_IMATRIX = {"IQ3_XXS"}


def llama_like(n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, tied=False, rope_freqs=False, arch="llama"):
    """The GGUF tensor list (numpy-order shapes) of a Llama-shaped model."""
    hd = n_embd // n_head
    t = [TensorSpec("token_embd.weight", (n_vocab, n_embd))]
    if rope_freqs:
        t.append(TensorSpec("rope_freqs.weight", (hd // 2,)))
    t.append(TensorSpec("output_norm.weight", (n_embd,)))
    if not tied:
        t.append(TensorSpec("output.weight", (n_vocab, n_embd)))
    for i in range(n_layer):
        b = f"blk.{i}."
        t += [TensorSpec(b + "attn_norm.weight", (n_embd,)),
              TensorSpec(b + "attn_q.weight", (n_head * hd, n_embd)),
              TensorSpec(b + "attn_k.weight", (n_head_kv * hd, n_embd)),
              TensorSpec(b + "attn_v.weight", (n_head_kv * hd, n_embd)),
              TensorSpec(b + "attn_output.weight", (n_embd, n_head * hd)),
              TensorSpec(b + "ffn_norm.weight", (n_embd,)),
              TensorSpec(b + "ffn_gate.weight", (n_ff, n_embd)),
              TensorSpec(b + "ffn_up.weight", (n_ff, n_embd)),
              TensorSpec(b + "ffn_down.weight", (n_embd, n_ff))]
    return t, ModelInfo(arch, n_layer, n_embd, n_head, n_head_kv)


def llama31_8b():
    return llama_like(128256, 4096, 32, 32, 8, 14336, rope_freqs=True)


def mixtral_8x7b():
    specs, _ = llama_like(32000, 4096, 32, 32, 8, 14336)
    out = []
    for s in specs:
        if ".ffn_gate.weight" in s.name:
            b = s.name.split("ffn_")[0]
            out += [TensorSpec(b + "ffn_gate_inp.weight", (8, 4096)),
                    TensorSpec(b + "ffn_gate_exps.weight", (8, 14336, 4096)),
                    TensorSpec(b + "ffn_up_exps.weight", (8, 14336, 4096)),
                    TensorSpec(b + "ffn_down_exps.weight", (8, 4096, 14336))]
        elif ".ffn_up." in s.name or ".ffn_down." in s.name:
            continue
        else:
            out.append(s)
    return out, ModelInfo("llama", 32, 4096, 32, 8, n_expert=8)


def falcon_7b():
    E, L, F_ = 4544, 32, 18176
    t = [TensorSpec("token_embd.weight", (65024, E)), TensorSpec("output_norm.weight", (E,)),
         TensorSpec("output_norm.bias", (E,)), TensorSpec("output.weight", (65024, E))]
    for i in range(L):
        b = f"blk.{i}."
        t += [TensorSpec(b + "attn_norm.weight", (E,)), TensorSpec(b + "attn_norm.bias", (E,)),
              TensorSpec(b + "attn_qkv.weight", (E + 2 * 64, E)), TensorSpec(b + "attn_output.weight", (E, E)),
              TensorSpec(b + "ffn_up.weight", (F_, E)), TensorSpec(b + "ffn_down.weight", (E, F_))]
    return t, ModelInfo("falcon", L, E, 71, 1)


def deepseek_like(arch: str = "deepseek2"):
    """DeepSeek-V2-Lite shapes: MLA attention (attn_kv_b), one dense layer, 64 routed experts + shared."""
    E, L, X, FF, FE = 2048, 6, 64, 10944, 1408
    t = [TensorSpec("token_embd.weight", (102400, E)), TensorSpec("output_norm.weight", (E,)),
         TensorSpec("output.weight", (102400, E))]
    for i in range(L):
        b = f"blk.{i}."
        t += [TensorSpec(b + "attn_norm.weight", (E,)), TensorSpec(b + "attn_q.weight", (16 * 192, E)),
              TensorSpec(b + "attn_kv_a_mqa.weight", (576, E)), TensorSpec(b + "attn_kv_a_norm.weight", (512,)),
              TensorSpec(b + "attn_kv_b.weight", (16 * 256, 512)), TensorSpec(b + "attn_output.weight", (E, 16 * 128)),
              TensorSpec(b + "ffn_norm.weight", (E,))]
        if i == 0:
            t += [TensorSpec(b + "ffn_gate.weight", (FF, E)), TensorSpec(b + "ffn_up.weight", (FF, E)),
                  TensorSpec(b + "ffn_down.weight", (E, FF))]
        else:
            t += [TensorSpec(b + "ffn_gate_inp.weight", (X, E)),
                  TensorSpec(b + "ffn_gate_exps.weight", (X, FE, E)), TensorSpec(b + "ffn_up_exps.weight", (X, FE, E)),
                  TensorSpec(b + "ffn_down_exps.weight", (X, E, FE)),
                  TensorSpec(b + "ffn_gate_shexp.weight", (2 * FE, E)), TensorSpec(b + "ffn_up_shexp.weight", (2 * FE, E)),
                  TensorSpec(b + "ffn_down_shexp.weight", (E, 2 * FE))]
        if arch == "bailingmoe3":      # a stacked (3-D) attention tensor: not an expert for MXFP4_MOE there
            t.append(TensorSpec(b + "attn_q_b.weight", (4, 16 * 192, 512)))
    return t, ModelInfo(arch, L, E, 16, 16, n_expert=X)


# synthetic tensor lists of real architectures, as their GGUF files name and shape them (numpy order)
SYNTHETIC = {
    "llama3-8b": llama31_8b,
    "llama3.1-70b": lambda: llama_like(128256, 8192, 80, 64, 8, 28672, rope_freqs=True),
    "smollm2-135m": lambda: llama_like(49152, 576, 30, 9, 3, 1536, tied=True),
    "tinyllama-10m": lambda: llama_like(8192, 256, 8, 4, 2, 768),
    "odd-rows": lambda: llama_like(1000, 200, 5, 5, 1, 520, tied=True),   # 200 % 32 != 0: F16 fallbacks
    "qwen2-0.5b": lambda: llama_like(151936, 896, 24, 14, 2, 4864, tied=True, arch="qwen2"),
    "mixtral-8x7b": mixtral_8x7b,
    "falcon-7b": falcon_7b,
    "deepseek-v2-lite": deepseek_like,
    "bailingmoe3-like": lambda: deepseek_like("bailingmoe3"),
}


def reference_mismatches(specs, info, ftype: str) -> list[str]:
    """Mismatches between make_plan and llama.cpp's llama_quant_compute_types (no imatrix: that
    function always plans as without one)."""
    from ggufq_ref import llama_ref

    ref = llama_ref.compute_types(specs, info, ftype)
    plan = make_plan(specs, info, ftype)
    bad = []
    for e in plan.entries:
        if ref[e.name] is None:            # llama-quantize copies it: we must not have quantized it
            if e.qtype not in (T.F32, T.F16, T.BF16) or "not quantized" not in e.reason:
                bad.append(f"{e.name}: plan {e.qtype.name}, llama.cpp does not quantize it")
        elif e.qtype != ref[e.name]:
            bad.append(f"{e.name}: plan {e.qtype.name}, llama.cpp {ref[e.name].name} ({e.reason})")
    return bad


def synthetic_table(types) -> int:
    """Per synthetic architecture and --type: mismatches against llama_quant_compute_types."""
    from ggufq_ref import llama_ref

    if not llama_ref.available():
        print("llama-cpp-python's libllama is not loadable: no synthetic-architecture table\n")
        return 0
    print("synthetic architectures: mismatches against llama.cpp's llama_quant_compute_types")
    total = 0
    for model, fn in SYNTHETIC.items():
        specs, info = fn()
        counts = []
        for ft in types:
            bad = reference_mismatches(specs, info, ft)
            total += len(bad)
            counts.append(f"{ft} {len(bad)}")
            for b in bad[:3]:
                print(f"    {model} {ft}: {b}")
        print(f"{model:<18} " + ", ".join(counts))
    print()
    return total


def write_imatrix(path: Path, specs, seed: int = 0, count: int = 3584) -> Path:
    """A GGUF importance matrix, as llama-imatrix writes one, for every quantizable matrix but
    token_embd (llama-imatrix never sees it): per-column sums of squares over ``count`` tokens."""
    import gguf
    import numpy as np

    from ggufq.plan import rules as R
    from ggufq_ref.parity import synthetic_imatrix

    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", count // 512)
    w.add_uint32("imatrix.chunk_size", 512)
    for s in specs:
        if R.unquantized_reason(s.name, s.shape) is None and s.name != "token_embd.weight":
            n_mat = s.shape[-3] if len(s.shape) >= 3 else 1
            v = np.concatenate([synthetic_imatrix(s.shape[-1], seed + j) for j in range(n_mat)])
            w.add_tensor(s.name + ".in_sum2", (v * np.float32(count)).astype(np.float32).reshape(n_mat, -1))
            w.add_tensor(s.name + ".counts", np.full((n_mat, 1), count, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def published_table() -> int:
    """Our plan's bits per weight for Llama-3.1-8B's tensors next to llama.cpp's published figures."""
    specs, info = llama31_8b()
    print(f"Llama-3.1-8B tensor list ({sum(math.prod(s.shape) for s in specs):,} weights): "
          "bits per weight, plan vs llama.cpp tools/quantize/README.md")
    print(f"{'type':<7} {'plan':>8} {'README':>8} {'GiB':>6}")
    bad = 0
    for ft, want in PUBLISHED_BPW.items():
        p = make_plan(specs, info, ft, has_imatrix=ft in PUBLISHED_WITH_IMATRIX)
        ok = round(p.bits_per_weight, 4) == want
        bad += not ok
        print(f"{ft:<7} {p.bits_per_weight:>8.4f} {want:>8.4f} {p.total_bytes / 2**30:>6.2f}{'' if ok else '  MISMATCH'}")
    print()
    return bad


def quantize_tool(llama_bin: Path) -> Path:
    exe = Path(llama_bin) / "llama-quantize"
    if not exe.exists():
        raise FileNotFoundError(f"llama-quantize not found in {llama_bin} (set --llama-bin or GGUFQ_LLAMA_BIN)")
    return exe


def make_f16(model_dir: Path, out: Path, converter: str = "llama.cpp") -> Path:
    """An F16 GGUF of ``model_dir`` at ``out`` (kept when it is already there)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    if converter == "llama.cpp":
        cmd = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", "f16", "--outfile", str(tmp)]
    else:
        cmd = [sys.executable, "-m", "ggufq.cli", "convert", str(model_dir), "-o", str(tmp), "--type", "F16"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    tmp.rename(out)
    return out


class ImatrixRequired(RuntimeError):
    """llama-quantize refused: the --type needs an importance matrix."""


def quantize(llama_bin: Path, src: Path, dst: Path, ftype: str, threads: int = 2,
             imatrix: Optional[Path] = None) -> Path:
    exe = quantize_tool(llama_bin)
    inputs = [src, exe] + ([imatrix] if imatrix else [])
    if dst.exists() and dst.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return dst                      # cached: llama-quantize's output only changes with its inputs or binary
    env = {**os.environ, "LD_LIBRARY_PATH": f"{llama_bin}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    tmp = dst.with_suffix(".tmp.gguf")
    r = subprocess.run([str(exe)] + (["--imatrix", str(imatrix)] if imatrix else []) +
                       [str(src), str(tmp), ftype, str(threads)], capture_output=True, text=True, env=env)
    if r.returncode:
        out = r.stdout + r.stderr
        tmp.unlink(missing_ok=True)
        if "requires an importance matrix" in out or "requires an imatrix" in out:
            raise ImatrixRequired(f"llama-quantize {ftype} needs an imatrix")
        raise RuntimeError(f"llama-quantize {ftype} failed:\n{out[-2000:]}")
    tmp.rename(dst)
    return dst


def gguf_types(path: Path) -> dict[str, tuple[T, int]]:
    """name -> (type, bytes) of every tensor in a GGUF file."""
    out = {}
    for name, shape, qtype in read_header(path)[1]:
        bs, ts = GGML_QUANT_SIZES[qtype]
        out[name] = (qtype, math.prod(shape) // bs * ts)
    return out


def compare(plan, path: Path) -> tuple[list[str], int]:
    """Mismatches ("name: plan X, file Y") between a plan and a GGUF file, and the file's tensor bytes."""
    got = gguf_types(path)
    bad = []
    for e in plan.entries:
        if e.name not in got:
            bad.append(f"{e.name}: planned, not in file")
        elif got[e.name][0] != e.qtype:
            bad.append(f"{e.name}: plan {e.qtype.name}, file {got[e.name][0].name} ({e.reason})")
    bad += [f"{n}: in file, not planned" for n in sorted(set(got) - {e.name for e in plan.entries})]
    return bad, sum(b for _, b in got.values())


def check_type(llama_bin: Path, f16: Path, specs, info, ftype: str, dst: Path,
               imatrix: Optional[Path] = None):
    """llama-quantize ``f16`` as ``ftype`` (with ``imatrix`` or none) and compare with the plan.

    Returns (plan, mismatches, file bytes or None when llama-quantize refused for want of an imatrix);
    a refusal is a mismatch unless the plan needs an imatrix too, and the other way round."""
    plan = make_plan(specs, info, ftype, has_imatrix=imatrix is not None)
    need = bool(plan.needs_imatrix()) and imatrix is None
    try:
        out = quantize(llama_bin, f16, dst, ftype, imatrix=imatrix)
    except ImatrixRequired:
        return plan, ([] if need else ["llama-quantize wants an imatrix, the plan does not"]), None
    if need:
        return plan, [f"the plan wants an imatrix ({plan.needs_imatrix()[0].name}), llama-quantize did without"], None
    bad, file_bytes = compare(plan, out)
    return plan, bad, file_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, default=None,
                    help="HF model folders (default: tinyllama-spm-10m, smollm2-135m-dither when built)")
    ap.add_argument("--types", nargs="+", default=ALL_TYPES, help="llama-quantize types (default: all)")
    ap.add_argument("--imatrix", choices=["none", "synthetic", "both"], default="both",
                    help="run llama-quantize without an imatrix, with a synthetic one, or both (default)")
    ap.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN, help=f"llama.cpp tools (default {DEFAULT_BIN})")
    ap.add_argument("--scratch", type=Path, default=scratch("ggufq-plan-parity"),
                    help="where F16 and quantized GGUFs are cached")
    ap.add_argument("--converter", choices=["llama.cpp", "ggufq"], default="llama.cpp",
                    help="what makes the F16 GGUF llama-quantize reads")
    ap.add_argument("--specs", choices=["gguf", "ggufq"], default="gguf",
                    help="tensor list for the plan: from the F16 GGUF, or ggufq.convert.tensor_specs(model_dir)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every mismatch")
    ap.add_argument("--no-published", action="store_true", help="skip the Llama-3.1-8B bits-per-weight table")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic-architecture table")
    a = ap.parse_args(argv)
    total_bad = 0 if a.no_published else published_table()
    if not a.no_synthetic:
        total_bad += synthetic_table(a.types)
    try:
        quantize_tool(a.llama_bin)
    except FileNotFoundError as e:
        print(f"plan_parity: {e}", file=sys.stderr)
        return 2
    models = a.models or [m for m in DEFAULT_MODELS if m.exists()]
    modes = ["none", "synthetic"] if a.imatrix == "both" else [a.imatrix]
    print(f"{'model':<28} {'type':<9} {'imatrix':<9} {'tensors':>7} {'mismatch':>8} {'fallback':>8} "
          f"{'plan bytes':>12} {'file bytes':>12} {'bpw':>7} {'s':>5}")
    for m in models:
        f16 = make_f16(m, a.scratch / f"{m.name}.{a.converter}.f16.gguf", a.converter)
        if a.specs == "gguf":
            specs, info = specs_from_gguf(f16)
        else:
            from ggufq.convert import tensor_specs
            specs, info = tensor_specs(m)
        im_path = None
        if "synthetic" in modes:
            im_path = a.scratch / f"{m.name}.{a.converter}.imatrix.gguf"
            if not im_path.exists() or im_path.stat().st_mtime < f16.stat().st_mtime:
                write_imatrix(im_path, specs_from_gguf(f16)[0])
        for ft in a.types:
            for mode in modes:
                if mode == "synthetic" and R_FTYPES[ft][1] in (T.F32, T.F16, T.BF16):
                    continue            # an imatrix changes nothing for unquantized types
                t0 = time.time()
                im = im_path if mode == "synthetic" else None
                dst = a.scratch / f"{m.name}.{a.converter}.{ft}{'.im' if im else ''}.gguf"
                plan, bad, file_bytes = check_type(a.llama_bin, f16, specs, info, ft, dst, im)
                total_bad += len(bad)
                fb = "refused" if file_bytes is None else str(file_bytes)
                print(f"{m.name:<28} {ft:<9} {mode:<9} {len(plan.entries):>7} {len(bad):>8} {plan.n_fallback:>8} "
                      f"{plan.total_bytes:>12} {fb:>12} {plan.bits_per_weight:>7.4f} {time.time() - t0:>5.1f}",
                      flush=True)
                for b in bad[: None if a.verbose else 5]:
                    print(f"    {b}")
    print(f"total mismatches: {total_bad}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
