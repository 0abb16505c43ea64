"""Per architecture, on a tiny synthetic checkpoint: ``ggufq eval``'s PPL against llama-perplexity's, and the
KL divergence of ``--method calibrated`` against ``--method kquant`` at the same type.

    python -m tools.arch_quality                                   # every family of tools/synthetic_archs.py
    python -m tools.arch_quality --arch qwen3 gemma2 --type Q4_K_M --chunks 8
    python -m tools.arch_quality --train-steps 300                  # trained first (torch; a GPU when present)
    python -m tools.arch_quality --arch qwen3 smollm3 olmo2 granite --bpe-merges 8000 --train-steps 100 \
        --train-seq 128 --train-batch 4 --lr 3e-3 --type Q4_K_M Q3_K_M --keep DIR   # CPU-sized (docs/ARCHS.md)

For each family (hidden 256, 4 layers, 3 BF16 shards, seed 7; K-quant rows need 256 columns), trained first
with ``--train-steps N`` (tools/train_tiny.py on the evaluation text less its first ``--skip-bytes``, which
the evaluation's chunks lie in; ``--bpe-merges N`` truncates the byte-level BPE families' 151k vocabulary to
the byte tokens + N merges so that training fits a CPU; ``--keep DIR`` reuses a checkpoint trained there with
the same recipe):

1. llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` -> ``llama-perplexity -c CTX -b CTX --chunks N`` (its PPL;
   a truncated vocabulary's chktxt hash is unknown to llama.cpp's converter, so llama-perplexity then reads
   ggufq's F16);
2. ``ggufq convert --type F16`` -> ``ggufq eval`` on the same text, context and chunks (PPL, and its relative
   difference from 1.);
3. per ``--type T``: ``ggufq convert --type T --method kquant`` and ``--method calibrated --calib-tokens K`` ->
   ``ggufq eval --ref`` ggufq's F16: mean KLD and same-top-token %, and the calibrated/k-quant KLD ratio.

Untrained, the weights are random (normal, unit-gain layers): the PPL comparison is exact whatever the weights,
but the KLD columns then only say that the calibrated path runs end to end on each arch (docs/ARCHS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ggufq.eval import evaluate
from tools.common import LLAMA_CONVERT, WIKITEXT as WIKI, llama_bin
from tools.crosscheck_eval import parse_ppl, run_parsed
from tools.synthetic_archs import FAMILIES, make_arch

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, env=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[1])).name} failed: {(r.stdout + r.stderr)[-1500:]}")
    return r


RECIPE = ("train_steps", "train_seq", "train_batch", "lr", "skip_bytes", "bpe_merges")


def checkpoint(fam: str, work: Path, a) -> tuple[Path, dict | None]:
    """The family's checkpoint in ``work/fam``, trained first with ``--train-steps``; one trained with the same
    recipe already there (``--keep``: its ``trained.json``) is reused."""
    d = work / fam
    recipe = {k: getattr(a, k) for k in RECIPE}
    done = d / "trained.json"
    if a.train_steps and done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("recipe") == recipe:
            return d, prev
    make_arch(d, fam, hidden=256, layers=4, heads=4, kv_heads=2, ff=512, shards=3, seed=7,
              scale=0.0 if a.train_steps else 1.0, bpe_merges=a.bpe_merges)   # trained from HF's 0.02 init
    if not a.train_steps:
        return d, None
    from tools.train_tiny import train
    text = a.text.read_bytes()[a.skip_bytes:].decode("utf-8", "replace")
    trained = train(d, text, a.train_steps, seq=a.train_seq, batch=a.train_batch, lr=a.lr,
                    log=lambda m: print(m, file=sys.stderr))
    trained["recipe"] = recipe
    done.write_text(json.dumps(trained))
    return d, trained


def row(fam: str, work: Path, a) -> dict:
    """Long because one family's whole protocol (checkpoint, both F16 files and their PPLs, then per type the
    k-quant and calibrated files and their KLDs) shares the paths and the evaluation settings."""
    d, trained = checkpoint(fam, work, a)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ggufq = [sys.executable, "-m", "ggufq", "convert", d, "-q", "-f", "-j", str(a.threads)]
    lf16, gf16 = work / f"{fam}-llama-F16.gguf", work / f"{fam}-ggufq-F16.gguf"
    _run(ggufq + ["-o", gf16, "--type", "F16"], env=env)
    ev = dict(text=a.text, ctx=a.ctx, chunks=a.chunks, threads=a.threads, gpu_layers=0, progress=False)
    ours = evaluate(gf16, **ev)
    out = {"fam": fam, "arch": FAMILIES[fam][0], "lp": float("nan"), "lp_file": "", "ours": ours.ppl,
           "rel": float("nan"), "trained": trained, "kld": {}}
    if not a.no_llama:
        # llama.cpp's converter refuses a truncated vocabulary (its chktxt hash is unknown to it): then
        # llama-perplexity reads ggufq's F16, which checks that llama.cpp loads it and agrees with ggufq eval
        truncated = a.bpe_merges is not None and FAMILIES[fam][2] == "bpe"
        if not truncated:
            _run([sys.executable, LLAMA_CONVERT, d, "--outtype", "f16", "--outfile", lf16])
        common = ["-f", a.text, "-c", a.ctx, "-b", a.ctx, "--chunks", a.chunks, "-t", a.threads]
        lp = run_parsed([llama_bin() / "llama-perplexity", "-m", gf16 if truncated else lf16, *common],
                        work / f"{fam}-lp.log", parse_ppl)
        out.update(lp=lp["ppl"], rel=ours.ppl / lp["ppl"] - 1, lp_file="ggufq's" if truncated else "llama.cpp's")
    print_ppl(out)
    for qtype in () if a.ppl_only else a.type:
        for method in ("kquant", "calibrated"):
            q = work / f"{fam}-{qtype}-{method}.gguf"
            extra = ["--calib-tokens", str(a.calib_tokens), "-ngl", "0"] if method == "calibrated" else []
            _run(ggufq + ["-o", q, "--type", qtype, "--method", method] + extra, env=env)
            r = evaluate(q, ref=gf16, **ev)
            out["kld"][f"{qtype} {method}"] = (r.kld["kld_mean"], r.kld["same_top"])
            if not a.keep:
                q.unlink()
        print_type(out, qtype)
    return out


def _training(t: dict | None) -> str:
    if not t:
        return "random weights"
    r = t.get("recipe", {})
    return (f"{r.get('train_steps')} steps x {r.get('train_seq', 0) * r.get('train_batch', 0)} tokens, "
            f"loss {t['loss_first']:.2f} -> {t['loss_last']:.2f}")


def print_ppl(r: dict) -> None:
    """A family's PPL line (markdown row of the table main() heads), printed as soon as it is measured."""
    print(f"| {r['arch']} | {_training(r['trained'])} | {r['lp']:.4f} ({r['lp_file'] or '-'} F16) | {r['ours']:.4f} | "
          f"{r['rel']:+.1e} |", flush=True)


def print_type(r: dict, qtype: str) -> None:
    """One type's KLD line under its family's PPL line."""
    (kk, tk), (kc, tc) = r["kld"][f"{qtype} kquant"], r["kld"][f"{qtype} calibrated"]
    print(f"|| {qtype} | {kk:.6f} | {kc:.6f} | {kc / kk:.2f} | {tk:.2%} / {tc:.2%} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(FAMILIES))
    ap.add_argument("--type", nargs="+", default=["Q4_K_M"], help="quantization types (default Q4_K_M)")
    ap.add_argument("--text", type=Path, default=WIKI, help="evaluation text (default: wikitext-2 test)")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=0, help="train each checkpoint first (tools/train_tiny.py)")
    ap.add_argument("--skip-bytes", type=int, default=200000, help="head of --text left out of training")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--bpe-merges", type=int, default=None,
                    help="byte-level BPE families: Qwen2's vocabulary truncated to its byte tokens + the first N "
                         "merges (tools/synthetic_archs.py), small enough to train on a CPU")
    ap.add_argument("--ppl-only", action="store_true", help="only the PPL columns")
    ap.add_argument("--no-llama", action="store_true", help="leave out llama.cpp's converter and llama-perplexity")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the checkpoints and files here (a checkpoint trained there with the same recipe "
                         "is reused)")
    a = ap.parse_args(argv)
    if a.ctx * a.chunks * 8 > a.skip_bytes:      # at most ~8 bytes a token
        ap.error(f"--ctx {a.ctx} x --chunks {a.chunks} may reach past --skip-bytes {a.skip_bytes} into training text")
    with tempfile.TemporaryDirectory(prefix="ggufq-archq-") as td:
        work = a.keep or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        print(f"ctx {a.ctx}, {a.chunks} chunks of {a.text.name}; {', '.join(a.type)}, calibrated with "
              f"{a.calib_tokens} tokens; " + (f"trained {a.train_steps} steps\n" if a.train_steps else "random weights\n"))
        rows = []
        print("| arch | training | llama-perplexity PPL (F16) | ggufq eval PPL (ggufq's F16) | rel. diff |")
        print("|| type | KLD kquant | KLD calibrated | calibrated / kquant | same top kquant / calibrated |")
        print("|---|---|---|---|---|---|")
        for fam in a.arch:
            try:
                r = row(fam, work, a)
            except Exception as e:  # one family failing does not hide the others
                print(f"| {FAMILIES[fam][0]} | error: {str(e).splitlines()[-1][:100]} |||||", flush=True)
                continue
            rows.append(r)
            if a.json:
                a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
