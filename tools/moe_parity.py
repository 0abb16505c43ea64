"""One row per MoE architecture / source format: ggufq vs llama.cpp's convert_hf_to_gguf.py.

    python -m tools.moe_parity                                  # every family, BF16 source
    python -m tools.moe_parity --arch qwen3moe --fp8 e4m3 --types F16 Q8_0
    python -m tools.moe_parity --arch gptoss gptoss-bf16 --types F16 BF16 Q8_0 F32

For each family of tools/synthetic_moe.py (8 experts, 2 active, 2 layers, 3 shards, real tokenizer
files): keys identical / total and tensors byte-identical / total for each --type (both converters
run; tools/compare_convert.py lists the differences), the max relative logits error of ggufq's F32
file through llama-cpp-python against ggufq_ref/forward.py (a NumPy forward with routing; FP8 sources
are compared against llama.cpp's own F32 conversion's logits instead, the reference reads no FP8;
gpt-oss against transformers' computation and against ggufq_ref.forward.LlamaCppDeviations),
and the number of tensors whose Q4_K_M / Q3_K_M type differs from llama.cpp's own choice
(``llama_quant_compute_types`` through ctypes, on llama.cpp's F16 conversion's tensors).
Needs torch + transformers (llama.cpp's converter).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


from tools.arch_parity import _run, converter_parity, plan_mismatches
from tools.common import LLAMA_CONVERT, ROOT, child_env
from tools.synthetic_moe import FAMILIES, make_moe

HERE = ROOT / "tools"
from tools.synthetic_gptoss import make_gpt_oss

GPT_OSS = {"gptoss": "GptOssForCausalLM, MXFP4 experts", "gptoss-bf16": "GptOssForCausalLM, BF16 experts"}

# OLMoE is multi-head (llama.cpp's olmoe loader wants attn_k_norm of n_embd, as OLMoE-1B-7B has)
SHAPES = {"qwen3moe": dict(hidden=64, ff=64, kv_heads=2), "mixtral": dict(hidden=256, ff=256, kv_heads=2),
          "qwen2moe": dict(hidden=64, ff=64, kv_heads=2, shared_ff=128), "olmoe": dict(hidden=64, ff=64, kv_heads=4)}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float((np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


def row(fam: str, work: Path, types, fp8=None) -> dict:
    tag = fam + (f"-fp8{fp8}" if fp8 else "")
    if fam in GPT_OSS:      # MXFP4 experts (or their BF16 dequantization), tools/synthetic_gptoss.py
        d = make_gpt_oss(work / tag, hidden=64, ff=64, layers=2, heads=4, kv_heads=2, experts=8, active=2,
                         shards=3, seed=7, bf16=fam == "gptoss-bf16")
    else:
        d = make_moe(work / tag, fam, layers=2, heads=4, experts=8, active=2, shards=3, seed=7, fp8=fp8,
                     **SHAPES[fam])
    env = child_env()
    out = {"arch": GPT_OSS[fam] if fam in GPT_OSS else FAMILIES[fam][0] + (f" FP8-{fp8}" if fp8 else "")}
    out.update(converter_parity(d, tag, work, types, env))
    from ggufq_ref.llama_worker import llama_logits
    f32 = work / f"{tag}-F32.gguf"
    _run([sys.executable, "-m", "ggufq", "convert", d, "-o", f32, "--type", "F32", "-q", "-f"], env=env)
    cfg = json.loads((d / "config.json").read_text())
    bos = cfg.get("bos_token_id")
    if bos is None:         # gpt-oss keeps it in generation_config.json only
        bos = json.loads((d / "generation_config.json").read_text())["bos_token_id"]
    ids = [bos] + list(np.random.default_rng(5).integers(3, 8000, 63))
    got = llama_logits(f32, ids)
    if fam in GPT_OSS:      # transformers' computation, and with llama.cpp's two deviations (ggufq_ref.forward)
        from ggufq_ref.forward import LlamaCppDeviations, Reference
        out["logits"] = (f"{rel_err(got, Reference(d).logits(ids)):.1e} (transformers' forward), "
                         f"{rel_err(got, LlamaCppDeviations(d).logits(ids)):.1e} (with llama.cpp's yarn and Q8_0 "
                         "activations)")
    elif fp8:
        ref_gguf = work / f"{tag}-llama-F32.gguf"
        _run([sys.executable, LLAMA_CONVERT, d, "--outtype", "f32", "--outfile", ref_gguf])
        out["logits"] = f"{rel_err(got, llama_logits(ref_gguf, ids)):.1e} (vs llama.cpp F32)"
    else:
        from ggufq_ref.forward import Reference
        out["logits"] = f"{rel_err(got, Reference(d).logits(ids)):.1e}"
    out.update({ft: f"{m} of {n}" for ft, (m, n) in plan_mismatches(work / f"{tag}-llama-F16.gguf", cfg).items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(FAMILIES) + list(GPT_OSS))
    ap.add_argument("--types", nargs="*", default=["F16", "BF16", "Q8_0"])
    ap.add_argument("--fp8", choices=["e4m3", "e5m2"], default=None)
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ggufq-moe-") as td:
        work = a.keep or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        cols = ["arch"] + a.types + ["logits", "Q4_K_M", "Q3_K_M"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for fam in a.arch:
            try:
                r = row(fam, work, a.types, a.fp8)
            except Exception as e:  # one family failing does not hide the others
                r = {"arch": GPT_OSS.get(fam) or FAMILIES[fam][0],
                     a.types[0] if a.types else "logits": f"error: {str(e).splitlines()[-1][:120]}"}
            print("| " + " | ".join(r.get(c, "-") for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
