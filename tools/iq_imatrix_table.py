#!/usr/bin/env python3
"""i-quant mixtures: llama-quantize with a real-text imatrix vs ggufq's self-made imatrix and calibrated method.

For each --type (IQ2_M, IQ3_XXS, ...), side by side in one run:

  llama-quantize + imatrix   llama-imatrix over --imatrix-text (--imatrix-chunks x 512 tokens) on the
                             F16 GGUF, then llama-quantize --imatrix (llama.cpp's calibrated path)
  ggufq, self-made imatrix   ggufq convert --type T with no --imatrix: the model writes --calib-tokens
                             of its own text through llama.cpp and the moments' diagonal is the imatrix
                             (made once and kept with --save-imatrix; later types pass it back with
                             --imatrix, which gives the same bytes -- tests/test_calib.py)
  ggufq --method calibrated  the same self-calibration (--calib-tokens), every matrix rounded with error
                             feedback against its input moments (GPTQ under the ggml encoder's block
                             scales; IQ2/IQ3 grid searches per 8 weights / quad with feedback between
                             them); same mixture, same size (--no-calibrated leaves the column out)

and the mean KL divergence of each against the F16 model on --text (ggufq eval, llama-perplexity's
protocol). Prints a markdown table; the ratio columns are self-made / real-text and calibrated /
real-text (issue #13's targets: within 5%, and at or below 0.85).

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
    ap.add_argument("--no-calibrated", dest="calibrated", action="store_false",
                    help="leave out the --method calibrated column")
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
        cal = None
        if a.calibrated:
            gc = a.work / f"gc-{t}.gguf"
            tc = run(ggufq("convert", a.model, "--type", t, "-o", gc, "--force", "-q", "-j", a.jobs,
                           "--method", "calibrated", "--calib-tokens", a.calib_tokens))
            cal = (gc.stat().st_size, kld(gc, f16, a.text, a.chunks, a.work, a.jobs), tc)
        rows.append((t, lq.stat().st_size, k_lq, gq.stat().st_size, k_gq, tl, tg, cal))
        print(f"{t}: llama-quantize {k_lq:.4f} ({tl:.0f} s), self-made imatrix {k_gq:.4f} ({tg:.0f} s)"
              + (f", calibrated {cal[1]:.4f} ({cal[2]:.0f} s)" if cal else ""), file=sys.stderr, flush=True)
    print(f"{Path(a.model).name}, mean KLD vs F16 on {a.text.name} ({a.chunks}x512); real-text imatrix: "
          f"llama-imatrix on {a.imatrix_text.name}, {a.imatrix_chunks}x512; self-made: {a.calib_tokens} tokens\n")
    head = "| type | llama-quantize + real imatrix: MiB | KLD | ggufq self-made imatrix: MiB | KLD | self / real |"
    if a.calibrated:
        head += " ggufq calibrated: MiB | KLD | calibrated / real |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for t, sl, kl, sg, kg, tl, tg, cal in rows:
        line = f"| {t} | {sl / 2**20:.2f} | {kl:.4f} | {sg / 2**20:.2f} | {kg:.4f} | {kg / kl:.3f} |"
        if cal:
            line += f" {cal[0] / 2**20:.2f} | {cal[1]:.4f} | {cal[1] / kl:.3f} |"
        print(line)
    print("\nseconds (wall, this machine): "
          + "; ".join(f"{t}: llama-quantize {tl:.0f}, self-made {tg:.0f}" + (f", calibrated {cal[2]:.0f}" if cal else "")
                      for t, sl, kl, sg, kg, tl, tg, cal in rows)
          + "".join(f"; {k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
