"""Self-check of ggufq_ref/forward.py against transformers (torch, float32) on a HF folder.

    python -m tools.check_reference fixtures/tinyllama-spm-10m [--text FILE] [--n 128]

Prints the relative error ||ref - hf|| / ||hf|| per position (max and mean) and the
top-1 agreement; exit code 1 when the max relative error exceeds --tol (default 1e-4).
Needs torch and transformers (not ggufq dependencies; only this check uses them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--text", default=None, help="evaluation text (default: the GCIDE held-out text)")
    ap.add_argument("--n", type=int, default=128, help="tokens to evaluate")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"check_reference: needs torch and transformers ({e})", file=sys.stderr)
        return 2
    from tools.common import HELDOUT
    from ggufq_ref.forward import Reference, hf_tokenize

    text = Path(a.text or HELDOUT).read_text(encoding="utf-8")[:20000]
    ids = hf_tokenize(a.model_dir, text)[: a.n]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].double().numpy()
    ref = Reference(a.model_dir).logits(ids).astype(np.float64)
    rel = np.linalg.norm(ref - hf, axis=1) / np.linalg.norm(hf, axis=1)
    top1 = float(np.mean(ref.argmax(1) == hf.argmax(1)))
    print("| model | tokens | max rel err | mean rel err | top-1 agreement |")
    print("|---|---|---|---|---|")
    print(f"| {Path(a.model_dir).name} | {len(ids)} | {rel.max():.2e} | {rel.mean():.2e} | {top1:.4f} |")
    return 0 if rel.max() < a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
