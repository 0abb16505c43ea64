"""Is an allocation at a size the best its type table allows? Around ``--target-size`` at one
llama-quantize mixture's size: the same measured table solved for larger budgets (the allocation's own
frontier: how many more bytes a KLD needs) and the best single-tensor one-step upgrades by predicted gain
per byte, each written and measured (the measured marginal rates against the solver's).

Example (tinyllama, calibrated, at Q5_K_M's size; SCRATCH as tools/pareto.py leaves it: f16.gguf, f16.kld
and lq-Q5_K_M.gguf are made when missing)::

    python -m tools.frontier --model MODEL_DIR --text heldout.txt --chunks 60 --work SCRATCH \\
        --preset Q5_K_M --method calibrated --sweep 1.03 1.06 1.10 1.15 --upgrades 8
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    from tools.hqq_table import kld, llama_bin, run
    from tools.pareto import _cpu

    from ggufq import alloc, calib
    from ggufq.convert import Options, allocation, convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="evaluation text for llama-perplexity")
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--work", required=True, help="scratch folder")
    ap.add_argument("--preset", default="Q5_K_M", help="llama-quantize mixture whose size is the budget")
    ap.add_argument("--method", default="calibrated")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--sweep", nargs="*", type=float, default=[1.03, 1.06, 1.10, 1.15],
                    help="budgets as multiples of the preset's size")
    ap.add_argument("--upgrades", type=int, default=8, help="one-step upgrades measured (best predicted gain/byte)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-bin", default=None)
    a = ap.parse_args()
    binp = llama_bin(a.llama_bin)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f16, base_kld, lq = work / "f16.gguf", work / "f16.kld", work / f"lq-{a.preset}.gguf"
    if not f16.exists():
        convert(a.model, f16, "F16", progress=False, jobs=1)
    if not base_kld.exists():
        run([binp / "llama-perplexity", "-m", f16, "-f", a.text, "--kl-divergence-base", base_kld, "--chunks",
             a.chunks, "-t", a.threads])
    if not lq.exists():
        run([binp / "llama-quantize", f16, lq, a.preset, str(a.threads)])
    size = lq.stat().st_size
    k_lq = kld(binp, lq, base_kld, a.chunks, a.threads)
    cal = calib.calibrate_folder(a.model, work, a.calib_tokens, jobs=1, progress=False)
    c0 = _cpu()
    tb = allocation(a.model, Options(method=a.method, jobs=1, calibration=cal, progress=False, target_size=size), work)
    print(f"llama-quantize {a.preset}: {size} B, KLD {k_lq:.5f}; allocation {_cpu() - c0:.1f} CPU s", flush=True)

    def measure(tag, types):
        out = work / f"frontier-{a.method}-{tag}.gguf"
        convert(a.model, out, options=Options(method=a.method, jobs=1, progress=False, force=True,
                                              calibration=cal if a.method != "kquant" else None, types=types,
                                              ftype=a.preset))
        return out.stat().st_size, kld(binp, out, base_kld, a.chunks, a.threads)

    al = alloc.resolve(tb, size)
    base = {e.name: e.qtype for e in al.plan.entries}
    b0, k0 = measure("1.00", base)
    print(f"| budget | bytes | KLD | x llama-quantize | predicted |\n|---|---|---|---|---|\n"
          f"| 1.00x | {b0} | {k0:.5f} | {k0 / k_lq:.3f}x | {al.predicted_kld:.5f} |", flush=True)
    for f in a.sweep:
        a2 = alloc.resolve(tb, int(size * f))
        b, k = measure(f"{f:.2f}", {e.name: e.qtype for e in a2.plan.entries})
        print(f"| {f:.2f}x | {b} | {k:.5f} | {k / k_lq:.3f}x | {a2.predicted_kld:.5f} |", flush=True)
    print(f"solver's marginal rate (predicted KLD per byte): {al.solution.lam:.3g}")
    cand = []
    for r in tb.rows:
        if base[r.name] not in r.types or r.types.index(base[r.name]) + 1 >= len(r.types):
            continue
        j = r.types.index(base[r.name])
        gain, db = tb.scales[r.name] * (r.error[j] - r.error[j + 1]), int(r.costs[j + 1] - r.costs[j])
        cand.append((gain / db, r.name, r.types[j + 1], gain, db))
    print("| upgrade | + bytes | predicted gain | measured gain | predicted / byte | measured / byte |\n"
          "|---|---|---|---|---|---|")
    for rate, name, t, gain, db in sorted(cand, key=lambda c: -c[0])[:a.upgrades]:
        _, k = measure(f"up-{name}", base | {name: t})
        print(f"| {name} -> {t.name} | {db} | {gain:.2e} | {k0 - k:.2e} | {rate:.2e} | {(k0 - k) / db:.2e} |",
              flush=True)
    cal.close()


if __name__ == "__main__":
    main()
