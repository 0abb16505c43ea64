#!/usr/bin/env python3
"""Does error feedback into the i-quant blocks (ggufq.quant.iq1_gptq, iq2_gptq, iq3_gptq, iq4_gptq) lower the output error?

For every matrix of MODEL_DIR with a full input moment (collected by llama.cpp through
ggufq.calib.calibrate_folder over a piece of TEXT), encodes with the ggml-identical encoder weighted by diag(H) ("plain") and with
GPTQ (8 weights at a time for IQ2/IQ1, quads for IQ3, columns for IQ4) under the same encoder's scales ("feedback"), and prints the product error
tr(E H E^T) of both: on the text the moments came from and on the next, disjoint piece of
the same text (held out). Prints a markdown table.

    python -m tools.iq3_feedback fixtures/tinyllama-spm-10m --text ../shared/data/gcide-heldout/heldout.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ggufq import calib, quant
from ggufq.convert import prepare
from ggufq.quant import gptq, iq1_gptq, iq2_gptq, iq3_gptq, iq4_gptq

FEEDBACK = {T.IQ3_XXS: iq3_gptq, T.IQ3_S: iq3_gptq, T.IQ4_XS: iq4_gptq, T.IQ4_NL: iq4_gptq,
            T.IQ2_XXS: iq2_gptq, T.IQ2_XS: iq2_gptq, T.IQ2_S: iq2_gptq, T.IQ1_S: iq1_gptq, T.IQ1_M: iq1_gptq}


def _err(qt, rows, blocks, m) -> float:
    e = (rows - dequantize(blocks, qt).reshape(rows.shape)).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, m, e))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--text", required=True, help="plain text; tokenized with the model's tokenizer.model")
    ap.add_argument("--types", default="IQ3_XXS,IQ3_S")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per piece (default 16)")
    ap.add_argument("--len", type=int, default=256, help="tokens per sequence, BOS included (default 256)")
    a = ap.parse_args(argv)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(Path(a.model_dir) / "tokenizer.model"))
    n = a.seqs * (a.len - 1)
    ids = np.array(sp.encode(Path(a.text).read_text()[: 12 * 2 * n]), np.int64)
    if ids.size < 2 * n:
        ap.error(f"{a.text}: {ids.size} tokens, need {2 * n}")
    pieces = [np.concatenate([np.ones((a.seqs, 1), np.int64), ids[i * n:(i + 1) * n].reshape(a.seqs, -1)], axis=1)
              for i in (0, 1)]
    types = [T[t.strip().upper()] for t in a.types.split(",")]
    p = prepare(a.model_dir)
    import tempfile
    with tempfile.TemporaryDirectory() as work, p.model:
        mom = [calib.calibrate_folder(a.model_dir, work, tokens=t, jobs=1, progress=False) for t in pieces]
        tot = {(qt, k): 0.0 for qt in types for k in ("plain", "fb", "plain_ho", "fb_ho")}
        print(f"{a.seqs}x{a.len} tokens per piece\n")
        print("| tensor | type | feedback / plain (same text) | feedback / plain (held-out text) | seconds |")
        print("|---|---|---|---|---|")
        for t in p.tensors:
            if len(t.shape) != 2 or t.shape[1] % 256:
                continue
            m_in, m_ho = (mm.moment(t.name) for mm in mom)
            if m_in is None or m_in.ndim != 2:
                continue                                  # no moment, or diagonal-only
            rows = t.read(0, t.shape[0]).astype(np.float32)
            h = gptq.Hessian.from_moment(m_in)
            for qt in types:
                t0 = time.perf_counter()
                plain = quant.encode(qt, rows, h.diag)
                fb = FEEDBACK[qt].encode(qt, rows, h, start=quant.encode)
                dt = time.perf_counter() - t0
                e = {"plain": _err(qt, rows, plain, m_in), "fb": _err(qt, rows, fb, m_in),
                     "plain_ho": _err(qt, rows, plain, m_ho), "fb_ho": _err(qt, rows, fb, m_ho)}
                for k, v in e.items():
                    tot[(qt, k)] += v
                print(f"| {t.name} | {qt.name} | {e['fb'] / e['plain']:.3f} | {e['fb_ho'] / e['plain_ho']:.3f} "
                      f"| {dt:.1f} |", flush=True)
        for qt in types:
            print(f"| **all** | {qt.name} | {tot[(qt, 'fb')] / tot[(qt, 'plain')]:.3f} "
                  f"| {tot[(qt, 'fb_ho')] / tot[(qt, 'plain_ho')]:.3f} | |")
        for mm in mom:
            mm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
