"""One row per architecture: ggufq vs llama.cpp's convert_hf_to_gguf.py on a synthetic checkpoint.

    python -m tools.arch_parity                       # every family, tiny shapes
    python -m tools.arch_parity --arch qwen3 gemma3 --types F16

For each family of tools/synthetic_archs.py (hidden 128, 4 layers, 3 bf16 shards, real tokenizer
files): keys identical / total and tensors byte-identical / total for F16, BF16 and Q8_0 (both
converters run; tools/compare_convert.py lists the differences), the max relative logits error of
ggufq's F32 file through llama-cpp-python against ggufq_ref/forward.py, and the number of tensors whose
Q4_K_M / Q3_K_M type differs from llama.cpp's own choice (``llama_quant_compute_types`` through
ctypes, on llama.cpp's F16 conversion's tensors). Needs torch + transformers (llama.cpp's converter).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


from tools.common import LLAMA_CONVERT, OUTTYPE, ROOT, child_env
from tools.compare_convert import compare
from tools.synthetic_archs import FAMILIES, make_arch

HERE = ROOT / "tools"


def _run(cmd, env=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed: {r.stderr[-1500:]}")


def converter_parity(d: Path, tag: str, work: Path, types, env) -> dict:
    """type -> "k/K keys, t/T tensors[, n DIFF]": llama.cpp's convert_hf_to_gguf.py against ggufq convert."""
    out = {}
    for t in types:
        a, b = work / f"{tag}-llama-{t}.gguf", work / f"{tag}-ggufq-{t}.gguf"
        _run([sys.executable, LLAMA_CONVERT, d, "--outtype", OUTTYPE[t], "--outfile", a])
        _run([sys.executable, "-m", "ggufq", "convert", d, "-o", b, "--type", t, "-q", "-f"], env=env)
        rows, equal, (ka, kb, na, nb) = compare(a, b)
        bad = [r for r in rows if r[4] == "DIFF"]
        out[t] = f"{equal['keys']}/{ka} keys, {equal['tensors']}/{na} tensors" + (f", {len(bad)} DIFF" if bad else "")
    return out


def row(fam: str, work: Path, types) -> dict:
    d = make_arch(work / fam, fam, hidden=128, layers=4, heads=4, kv_heads=2, ff=256, shards=3, seed=7)
    env = child_env()
    out = {"arch": FAMILIES[fam][0]}
    out.update(converter_parity(d, fam, work, types, env))
    # logits
    from ggufq_ref.llama_worker import llama_logits
    from ggufq_ref.forward import Reference
    import json
    f32 = work / f"{fam}-F32.gguf"
    _run([sys.executable, "-m", "ggufq", "convert", d, "-o", f32, "--type", "F32", "-q", "-f"], env=env)
    cfg = json.loads((d / "config.json").read_text())
    ids = [cfg["bos_token_id"]] + list(np.random.default_rng(5).integers(3, 8000, 63))
    ref = Reference(d).logits(ids).astype(np.float64)
    got = llama_logits(f32, ids).astype(np.float64)
    out["logits"] = f"{(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max():.1e}"
    # plan types vs llama.cpp's own choice on llama.cpp's F16 tensors
    out.update({ft: str(m) for ft, (m, _) in plan_mismatches(work / f"{fam}-llama-F16.gguf", cfg).items()})
    return out


def plan_mismatches(src: Path, cfg: dict, ftypes=("Q4_K_M", "Q3_K_M")) -> dict[str, tuple[int, int]]:
    """ftype -> (tensors whose planned type differs from llama.cpp's own choice, tensors llama.cpp typed)
    on the tensors of llama.cpp's F16 GGUF ``src``; empty without it or without the ctypes reference."""
    from ggufq.plan import make_plan, specs_from_gguf
    from ggufq_ref import llama_ref
    if not (src.is_file() and llama_ref.available()):
        return {}
    specs, info = specs_from_gguf(src)
    out = {}
    for ft in ftypes:
        plan = make_plan(specs, info, ft)
        ref_t = llama_ref.compute_types(specs, info, ft, n_ff=int(cfg.get("intermediate_size", 0)))
        out[ft] = (sum(1 for e in plan.entries if ref_t.get(e.name) is not None and ref_t[e.name] != e.qtype),
                   len(ref_t))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(FAMILIES))
    ap.add_argument("--types", nargs="*", default=["F16", "BF16", "Q8_0"])
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ggufq-archs-") as td:
        work = a.keep or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        cols = ["arch"] + a.types + ["logits", "Q4_K_M", "Q3_K_M"]
        print("| " + " | ".join(c if c in ("arch", "logits") or c.startswith("Q") and "_K_" in c and c not in a.types
                                 else c for c in cols) + " |")
        print("|" + "---|" * len(cols))
        for fam in a.arch:
            try:
                r = row(fam, work, a.types)
            except Exception as e:  # one family failing does not hide the others
                r = {"arch": FAMILIES[fam][0], a.types[0]: f"error: {str(e).splitlines()[-1][:80]}"}
            print("| " + " | ".join(r.get(c, "-") for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
