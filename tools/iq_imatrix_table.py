#!/usr/bin/env python3
"""i-quant mixtures: llama-quantize with a real-text imatrix vs ggufq with the imatrix it makes itself.

For each --type (IQ2_M, IQ3_XXS, ...), side by side in one run:

  llama-quantize + imatrix   llama-imatrix over --imatrix-text (--imatrix-chunks x 512 tokens) on the
                             F16 GGUF, then llama-quantize --imatrix (llama.cpp's calibrated path)
  ggufq, self-made imatrix   ggufq convert --type T with no --imatrix: the model writes --calib-tokens
                             of its own text through llama.cpp and the moments' diagonal is the imatrix
                             (made once and kept with --save-imatrix; later types pass it back with
                             --imatrix, which gives the same bytes -- tests/test_calib.py)

and the mean KL divergence of each against the F16 model on --text (ggufq eval, llama-perplexity's
protocol). Prints a markdown table; the ratio column is self-made / real-text.

    python -m tools.iq_imatrix_table fixtures/tinyllama-spm-10m --text ../shared/data/gcide-heldout/heldout.txt \
        --imatrix-text ../shared/data/wikitext-2-raw/wiki.test.raw --chunks 60 --work SCRATCH
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from tools.common import LLAMA_BIN, child_env, timed



def run(cmd: list) -> float:
    return timed(cmd, env=child_env())


def ggufq(*args) -> list:
    return [sys.executable, "-m", "ggufq", *args]


def kld(model: Path, ref: Path, text: Path, chunks: int, work: Path, threads: int) -> float:
    out = work / (model.stem + ".eval.json")
    run(ggufq("eval", model, "--ref", ref, "--text", text, "--chunks", chunks, "-t", threads, "-q", "--json", out))
    return float(json.loads(out.read_text())["kld"]["kld_mean"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True, type=Path, help="evaluation text")
    ap.add_argument("--imatrix-text", required=True, type=Path, help="llama-imatrix's real text")
    ap.add_argument("--imatrix-chunks", type=int, default=100)
    ap.add_argument("--types", nargs="+", default=["IQ2_M", "IQ2_XXS", "IQ3_XXS", "IQ3_M", "IQ4_XS"])
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", required=True, type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    f16, real, mine = a.work / "f16.gguf", a.work / "real.imatrix.gguf", a.work / "self.imatrix.gguf"
    if not f16.exists():
        run(ggufq("convert", a.model, "--type", "F16", "-o", f16, "-q"))
    times = {}
    if not real.exists():
        times["llama-imatrix"] = run([LLAMA_BIN / "llama-imatrix", "-m", f16, "-f", a.imatrix_text, "-o", real,
                                      "--chunks", a.imatrix_chunks, "-c", 512, "-t", a.jobs, "--no-ppl"])
    rows = []
    for i, t in enumerate(a.types):
        lq, gq = a.work / f"lq-{t}.gguf", a.work / f"gq-{t}.gguf"
        tl = run([LLAMA_BIN / "llama-quantize", "--imatrix", real, f16, lq, t, a.jobs])
        if i == 0 and not mine.exists():
            tg = run(ggufq("convert", a.model, "--type", t, "-o", gq, "--force", "-q", "-j", a.jobs,
                           "--calib-tokens", a.calib_tokens, "--save-imatrix", mine))
        else:
            tg = run(ggufq("convert", a.model, "--type", t, "-o", gq, "--force", "-q", "-j", a.jobs,
                           "--imatrix", mine))
        k_lq, k_gq = (kld(p, f16, a.text, a.chunks, a.work, a.jobs) for p in (lq, gq))
        rows.append((t, lq.stat().st_size, k_lq, gq.stat().st_size, k_gq, tl, tg))
    print(f"{Path(a.model).name}, mean KLD vs F16 on {a.text.name} ({a.chunks}x512); real-text imatrix: "
          f"llama-imatrix on {a.imatrix_text.name}, {a.imatrix_chunks}x512; self-made: {a.calib_tokens} tokens\n")
    print("| type | llama-quantize + real imatrix: MiB | KLD | ggufq self-made imatrix: MiB | KLD | self / real |")
    print("|---|---|---|---|---|---|")
    for t, sl, kl, sg, kg, tl, tg in rows:
        print(f"| {t} | {sl / 2**20:.2f} | {kl:.4f} | {sg / 2**20:.2f} | {kg:.4f} | {kg / kl:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
