#!/usr/bin/env python3
"""Quality of every type ggufq can write, against its own F16: a markdown table and a plot.

Converts MODEL_DIR with ``ggufq convert`` to F16 and to every --type (and preset)
this ggufq can encode (asked at run time: ``ggufq.plan.FTYPES`` whose tensors
``ggufq.quant.encoders()`` cover, plus ``ggufq.plan.maps.PRESETS``; a type whose
plan needs an encoder not there yet is skipped with the converter's message),
evaluates each with ``ggufq.eval.evaluate(..., ref=F16)`` and writes

* a markdown table: type, size MB, bits/weight, PPL ± err, ΔPPL %, mean KLD ± err, same-top %,
* a PNG of mean KLD against bits/weight (needs matplotlib: ``pip install ggufq[tools]``).

Example::

    python -m tools.quality_table fixtures/tinyllama-spm-10m \\
        --text ../shared/data/gcide-heldout/heldout.txt --chunks 20 --out /tmp/q
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


from ggufq.eval import evaluate
from tools.common import child_env


def available_types() -> list[tuple[str, list[str]]]:
    """(label, extra convert args) for every --type / preset whose base type has an encoder."""
    from ggufq.plan import FTYPES
    from ggufq.quant import encoders

    enc = encoders()
    out = [(name, ["-t", name]) for name, (_, qtype) in FTYPES.items() if qtype in enc and name != "F32"]
    try:
        from ggufq.plan.maps import PRESETS
    except ImportError:
        PRESETS = {}
    for name in PRESETS:
        out.append((f"preset:{name}", ["-p", name]))
    return out


def convert(model_dir: Path, out: Path, args: list[str], jobs: int) -> str | None:
    """Runs ggufq's CLI; returns None on success, else its one-line error."""
    if out.exists():
        return None
    env = child_env()
    r = subprocess.run([sys.executable, "-m", "ggufq", "convert", str(model_dir), "-o", str(out), *args,
                        "-j", str(jobs), "-q"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["failed"])[-1]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", type=Path, required=True, help="evaluation text")
    ap.add_argument("--chunks", type=int, default=20, help="chunks of --ctx tokens (0 = all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", nargs="*", default=None,
                    help="--type names (or preset:NAME) to include (default: every one available)")
    ap.add_argument("--out", type=Path, default=Path("quality"), help="folder for GGUFs, table, JSON and plot")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-layers", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs (default: delete each after evaluation)")
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    name = a.model_dir.name
    cands = available_types()
    if a.types:
        want = {t.upper() if not t.startswith("preset:") else t for t in a.types}
        unknown = want - {c[0] for c in cands}
        if unknown:
            print(f"not available in this ggufq: {', '.join(sorted(unknown))}", file=sys.stderr)
        cands = [c for c in cands if c[0] in want]
    ref = a.out / f"{name}-F16.gguf"
    err = convert(a.model_dir, ref, ["-t", "F16"], a.jobs)
    if err:
        sys.exit(f"F16 conversion failed: {err}")

    kw = dict(text=a.text, ctx=a.ctx, chunks=a.chunks, threads=a.threads, gpu_layers=a.gpu_layers, progress=False)
    rows, skipped = [], []
    for label, args in cands:
        t0 = time.time()
        if label == "F16":
            path = ref
        else:
            path = a.out / f"{name}-{label.replace('preset:', 'preset-')}.gguf"
            err = convert(a.model_dir, path, args, a.jobs)
            if err:
                skipped.append((label, err))
                print(f"{label}: skipped ({err})", file=sys.stderr)
                continue
        res = evaluate(path, ref=ref, **kw)
        k = res.kld
        rows.append({
            "type": label, "file": path.name, "size_mb": path.stat().st_size / 1e6,
            "bpw": res.bits_per_weight, "ppl": res.ppl, "ppl_err": res.ppl_err,
            "dppl_pct": k["ppl_diff_pct"], "kld": k["kld_mean"], "kld_err": k["kld_err"],
            "kld_p99": k["kld_p99"], "same_top": k["same_top"], "same_top_err": k["same_top_err"],
            "n_scored": res.n_scored, "device": res.device, "seconds": time.time() - t0,
        })
        print(f"{label}: {res.bits_per_weight:.3f} bpw, PPL {res.ppl:.4f}, KLD {k['kld_mean']:.6f}, "
              f"same top {100 * k['same_top']:.2f} % ({time.time() - t0:.0f} s)", file=sys.stderr)
        if not a.keep and path != ref:
            path.unlink()
    if not rows:
        sys.exit("nothing evaluated")
    rows.sort(key=lambda r: -r["bpw"])

    n = rows[0]["n_scored"]
    lines = [
        f"Quality of ggufq's types for {name} against its F16 ({a.text.name}, {n} scored tokens: "
        f"{a.chunks or 'all'} chunks of {a.ctx}, {rows[0]['device']}).",
        "",
        "| type | size MB | bits/weight | PPL | ΔPPL % | mean KLD | KLD p99 | same top % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['type']} | {r['size_mb']:.2f} | {r['bpw']:.3f} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
                     f"{r['dppl_pct']:+.3f} | {r['kld']:.6f} ± {r['kld_err']:.6f} | {r['kld_p99']:.5f} | "
                     f"{100 * r['same_top']:.2f} ± {100 * r['same_top_err']:.2f} |")
    for label, why in skipped:
        lines.append(f"\n{label}: not converted: {why}")
    md = "\n".join(lines) + "\n"
    (a.out / f"quality-{name}.md").write_text(md)
    (a.out / f"quality-{name}.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    print(md)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install ggufq[tools]): no plot", file=sys.stderr)
        return 0
    pts = [r for r in rows if r["kld"] > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r["bpw"] for r in pts], [r["kld"] for r in pts])
    for r in pts:
        ax.annotate(r["type"].replace("preset:", ""), (r["bpw"], r["kld"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (llama.cpp's model size / parameters)")
    ax.set_ylabel("mean KL divergence from F16 (nats/token)")
    ax.set_title(f"{name}: KLD vs size ({n} tokens of {a.text.name})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = a.out / f"quality-{name}.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {a.out / f'quality-{name}.md'}, {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
