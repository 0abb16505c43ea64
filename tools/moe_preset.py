"""What ``--preset moe-keep-active`` buys on a synthetic MoE: size vs logits drift from the F32 file.

    python -m tools.moe_preset                      # Mixtral-shaped, 8 experts, hidden 256
    python -m tools.moe_preset --arch qwen2moe --experts 16

For --type in (Q4_K_M, Q3_K_M, Q2_K), with and without the preset: file bytes, bits per weight, the
routed experts' share of the bytes, and through llama-cpp-python on 128 random tokens the mean
KL(F32 || quantized) of the next-token distributions and the top-1 agreement with the F32 file.
The weights are random (tools/synthetic_moe.py), so this measures quantization noise reaching the
logits, not language quality.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


from tools.synthetic_moe import make_moe
from tools.common import ROOT, child_env

HERE = ROOT / "tools"


def _convert(d: Path, out: Path, t: str, preset=None):
    env = child_env()
    cmd = [sys.executable, "-m", "ggufq", "convert", str(d), "-o", str(out), "--type", t, "-q", "-f"]
    if preset:
        cmd += ["--preset", preset]
    subprocess.run(cmd, check=True, env=env)


def _logp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", nargs="*", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    a = ap.parse_args(argv)
    from ggufq_ref.llama_worker import llama_logits
    from ggufq.convert import make_plan, prepare
    with tempfile.TemporaryDirectory(prefix="ggufq-moe-preset-") as td:
        work = Path(td)
        d = make_moe(work / "m", a.arch, hidden=a.hidden, ff=a.hidden, layers=a.layers, experts=a.experts,
                     active=2, shared_ff=a.hidden, seed=5)
        ids = [1] + list(np.random.default_rng(9).integers(3, 8000, 127))
        _convert(d, work / "f32.gguf", "F32")
        ref = _logp(llama_logits(work / "f32.gguf", ids))
        p = prepare(d)
        print(f"{a.arch}, {a.experts} experts (2 active), hidden {a.hidden}, {a.layers} layers, "
              f"{p.n_params / 1e6:.1f} M parameters; 128 random tokens\n")
        print("| --type | preset | MiB | bpw | experts' share | mean KL vs F32 | top-1 agree |")
        print("|---|---|---|---|---|---|---|")
        for t in a.types:
            for preset in (None, "moe-keep-active"):
                out = work / f"{t}-{preset}.gguf"
                _convert(d, out, t, preset)
                plan = make_plan(p, t, preset=preset)
                exps = sum(e.nbytes for e in plan.entries if "_exps." in e.name)
                lp = _logp(llama_logits(out, ids))
                kl = float((np.exp(ref) * (ref - lp)).sum(axis=-1).mean())
                agree = float((ref.argmax(-1) == lp.argmax(-1)).mean())
                print(f"| {t} | {preset or '-'} | {out.stat().st_size / 2**20:.2f} | {plan.bits_per_weight:.3f} | "
                      f"{100 * exps / plan.total_bytes:.1f}% | {kl:.5f} | {100 * agree:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
