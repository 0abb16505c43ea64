#!/usr/bin/env python3
"""Plot (and tabulate) KLD against bits per weight from tools/hqq_table.py's results.jsonl files.

Several files may be given: a (type, method) measured in a later file replaces the earlier one,
so a rerun of some methods (e.g. `hqq` after a change) merges with an older full table.

  python -m tools.hqq_plot OLD/results.jsonl NEW/results.jsonl --png docs/img/x.png --title NAME
"""
from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--png", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--ylabel", default="mean KLD vs F16")
    ap.add_argument("--methods", nargs="+", default=None, help="methods to plot, in legend order")
    a = ap.parse_args()
    pts: dict[tuple[str, str], tuple[float, float]] = {}
    for path in a.results:
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                pts[(r["type"], r["method"])] = (r["bpw"], r["kld"])
    methods = a.methods or sorted({m for _, m in pts})
    types = sorted({t for t, _ in pts}, key=lambda t: pts.get((t, "llama-quantize"), (0, 0))[0])
    print("| type | bpw | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for t in types:
        b = next(v[0] for (tt, _), v in pts.items() if tt == t)
        print(f"| {t} | {b:.2f} | " + " | ".join(f"{pts[(t, m)][1]:.4f}" if (t, m) in pts else "-" for m in methods) + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xy = sorted(v for (t, mm), v in pts.items() if mm == m)
        if xy:
            ax.plot([p[0] for p in xy], [p[1] for p in xy], "o-", label=m)
    for t in types:
        vals = [v for (tt, _), v in pts.items() if tt == t]
        ax.annotate(t, (vals[0][0], max(v[1] for v in vals)), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(a.ylabel)
    ax.set_title(a.title)
    ax.legend()
    fig.savefig(a.png, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
