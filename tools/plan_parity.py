#!/usr/bin/env python3
"""Plan parity with llama-quantize: for each model and --type, quantize an F16 GGUF
with llama.cpp's llama-quantize and compare every tensor's type (and the total
tensor bytes) with what ``ggufq.plan.make_plan`` plans for the same tensors.

    PYTHONPATH=. python tools/plan_parity.py                      # tinyllama (+ smollm2 when built), all types
    PYTHONPATH=. python tools/plan_parity.py --types Q4_K_M Q4_0 --models /path/to/hf_model

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

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ggufq.plan import ModelInfo, TensorSpec, make_plan, specs_from_gguf  # noqa: E402
from ggufq.plan.gguf_header import read_header  # noqa: E402

LLAMA_CPP = Path(os.environ.get("GGUFQ_LLAMA_CPP", str(Path.home() / ".cache/ggufq/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp")))
DEFAULT_BIN = Path(os.environ.get("GGUFQ_LLAMA_BIN", str(Path.home() / ".cache/ggufq/llama-bin")))
DEFAULT_MODELS = [Path(__file__).resolve().parent.parent / "fixtures" / "tinyllama-spm-10m",
                  Path.home() / ".cache/ggufq/smollm2-135m-dither"]
ALL_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
             "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"]


# llama.cpp's tools/quantize/README.md, Meta-Llama-3.1-8B, "bits/weight"
PUBLISHED_BPW = {"Q2_K": 3.1593, "Q3_K_S": 3.6429, "Q3_K_M": 3.9960, "Q3_K_L": 4.2979, "Q4_K_S": 4.6672,
                 "Q4_K_M": 4.8944, "Q5_K_S": 5.5704, "Q5_K_M": 5.7036, "Q6_K": 6.5633, "Q8_0": 8.5008,
                 "F16": 16.0005}


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


def published_table() -> int:
    """Our plan's bits per weight for Llama-3.1-8B's tensors next to llama.cpp's published figures."""
    specs, info = llama31_8b()
    print(f"Llama-3.1-8B tensor list ({sum(math.prod(s.shape) for s in specs):,} weights): "
          "bits per weight, plan vs llama.cpp tools/quantize/README.md")
    print(f"{'type':<7} {'plan':>8} {'README':>8} {'GiB':>6}")
    bad = 0
    for ft, want in PUBLISHED_BPW.items():
        p = make_plan(specs, info, ft)
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


def quantize(llama_bin: Path, src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    exe = quantize_tool(llama_bin)
    if dst.exists() and dst.stat().st_mtime >= max(src.stat().st_mtime, exe.stat().st_mtime):
        return dst                      # cached: llama-quantize's output only changes with its input or binary
    env = {**os.environ, "LD_LIBRARY_PATH": f"{llama_bin}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    tmp = dst.with_suffix(".tmp.gguf")
    r = subprocess.run([str(exe), str(src), str(tmp), ftype, str(threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"llama-quantize {ftype} failed:\n{(r.stdout + r.stderr)[-2000:]}")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, default=None,
                    help="HF model folders (default: tinyllama-spm-10m, smollm2-135m-dither when built)")
    ap.add_argument("--types", nargs="+", default=ALL_TYPES, help="llama-quantize types (default: all)")
    ap.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN, help=f"llama.cpp tools (default {DEFAULT_BIN})")
    ap.add_argument("--scratch", type=Path, default=Path(os.environ.get("GGUFQ_SCRATCH", "/tmp/ggufq-plan-parity")),
                    help="where F16 and quantized GGUFs are cached")
    ap.add_argument("--converter", choices=["llama.cpp", "ggufq"], default="llama.cpp",
                    help="what makes the F16 GGUF llama-quantize reads")
    ap.add_argument("--specs", choices=["gguf", "ggufq"], default="gguf",
                    help="tensor list for the plan: from the F16 GGUF, or ggufq.convert.tensor_specs(model_dir)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every mismatch")
    ap.add_argument("--no-published", action="store_true", help="skip the Llama-3.1-8B bits-per-weight table")
    a = ap.parse_args(argv)
    total_bad = 0 if a.no_published else published_table()
    try:
        quantize_tool(a.llama_bin)
    except FileNotFoundError as e:
        print(f"plan_parity: {e}", file=sys.stderr)
        return 2
    models = a.models or [m for m in DEFAULT_MODELS if m.exists()]
    print(f"{'model':<28} {'type':<7} {'tensors':>7} {'mismatch':>8} {'fallback':>8} "
          f"{'plan bytes':>12} {'file bytes':>12} {'bpw':>7} {'s':>5}")
    for m in models:
        f16 = make_f16(m, a.scratch / f"{m.name}.{a.converter}.f16.gguf", a.converter)
        if a.specs == "gguf":
            specs, info = specs_from_gguf(f16)
        else:
            from ggufq.convert import tensor_specs
            specs, info = tensor_specs(m)
        for ft in a.types:
            t0 = time.time()
            out = quantize(a.llama_bin, f16, a.scratch / f"{m.name}.{a.converter}.{ft}.gguf", ft)
            plan = make_plan(specs, info, ft)
            bad, file_bytes = compare(plan, out)
            total_bad += len(bad)
            print(f"{m.name:<28} {ft:<7} {len(plan.entries):>7} {len(bad):>8} {plan.n_fallback:>8} "
                  f"{plan.total_bytes:>12} {file_bytes:>12} {plan.bits_per_weight:>7.4f} {time.time() - t0:>5.1f}")
            for b in bad[: None if a.verbose else 5]:
                print(f"    {b}")
    print(f"total mismatches: {total_bad}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
