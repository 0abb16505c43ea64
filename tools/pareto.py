"""KLD against file size: llama-quantize's presets, ggufq's presets and ggufq --target-size at the
same sizes (kquant and calibrated), one PNG per model and a printed table.

For each llama-quantize mixture in --presets (made from ggufq's F16 by llama-quantize), the target
is that file's size in bytes; ggufq allocates one table of measured errors and group sensitivities
per method (one self-calibration, one probe: :func:`ggufq.convert.allocation`), solves it for every
size (:func:`ggufq.alloc.resolve`) and writes each file through convert's explicit-types seam with the
recipe keys. Every file's mean KLD against the F16 logits comes from llama-perplexity (llama.cpp's
own tool, same chunks). Also printed: the rank correlation of the predicted KLD (the recipe's) with
the measured one over the allocations, with and without the probe's group scales.

Costly runs (SmolLM2's per-tensor probe: 8 CPU minutes) are split: ``--table`` keeps the measured
tables (pickled) and a later run solves them again without calibrating or probing; KLDs are cached
per file version in WORK/kld-cache.json; ``--targets-only`` skips ggufq's own preset files; ``--extra``
adds other files of the model (more mixtures, earlier targets) to the correlation; ``--self-text N``
measures every file also on N held-out self-calibration sequences, which separates the prediction's
own error from the shift between the model's text and the evaluation text.

Example (tinyllama, 60 chunks of 512 of its held-out text)::

    python -m tools.pareto --model MODEL_DIR --text heldout.txt --chunks 60 --work SCRATCH \\
        --presets Q2_K Q3_K_M Q4_K_M Q5_K_M IQ4_XS --png docs/img/pareto-tinyllama.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
from pathlib import Path

import numpy as np


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    from tools.hqq_table import kld, llama_bin, run

    from ggufq import alloc
    from ggufq.convert import Options, allocation, convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="evaluation text for llama-perplexity")
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--work", required=True, help="scratch folder")
    ap.add_argument("--presets", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS"])
    ap.add_argument("--methods", nargs="+", default=["kquant", "calibrated"])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", default=None)
    ap.add_argument("--png", default=None, help="plot file (needs matplotlib)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--label", default=None, help="model name in the plot title")
    ap.add_argument("--probe-sets", choices=["auto", "tensor", "layer"], default="auto",
                    help="the probe's sets (ggufq.alloc.probe.PROBE_SETS): auto = per tensor while their tokens fit "
                         "the self-calibration's, else per layer and role")
    ap.add_argument("--ablation", nargs="*", default=None, metavar="PRESET",
                    help="also allocate with the probe's measurements fitted as s[layer] x c[role], as one scale per "
                         "layer, and without the probe (scale 1 everywhere); first method only; at the sizes of the "
                         "PRESETs named (none named: every size)")
    ap.add_argument("--probe-type", default=None,
                    help="the probe's type (default ggufq.alloc.probe.PROBE_TYPE), through each tensor's row fallback")
    ap.add_argument("--probe-seqs", type=int, default=None,
                    help="self-calibration sequences the probe decodes per set (default ggufq.alloc.probe.PROBE_SEQS)")
    ap.add_argument("--table", default=None,
                    help="pickle of the measured tables (one per method: error table, probe, scales): read when it "
                         "exists (no calibration for kquant, no probe), else written after the allocation")
    ap.add_argument("--self-text", type=int, default=0, metavar="N",
                    help="also measure every file's KLD on N of the self-calibration's sequences that the probe did "
                         "not decode (the text the prediction is calibrated on, held out) and print that correlation "
                         "too")
    ap.add_argument("--extra", nargs="*", default=[], metavar="GGUF",
                    help="more files of this model (other mixtures, earlier runs' targets): measured, predicted with "
                         "the first method's table and counted in the rank correlation")
    ap.add_argument("--targets-only", action="store_true",
                    help="do not write ggufq's own preset files (kquant's are llama-quantize's bytes; the others "
                         "do not depend on the allocation): llama-quantize's files and the targets only")
    a = ap.parse_args()
    binp = llama_bin(a.llama_bin)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "f16.gguf"
    if not f16.exists():
        convert(a.model, f16, "F16", progress=False, jobs=a.jobs)
    base = work / "f16.kld"
    if not base.exists():
        run([binp / "llama-perplexity", "-m", f16, "-f", a.text, "--kl-divergence-base", base, "--chunks", a.chunks,
             "-t", a.threads])
    rows = []

    cache_p = work / "kld-cache.json"
    cache = json.loads(cache_p.read_text()) if cache_p.exists() else {}

    def kld_cached(path):
        """llama-perplexity's KLD, once per file version (name, size, mtime) and chunk count."""
        st = path.stat()
        key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{a.chunks}"
        if key not in cache:
            cache[key] = kld(binp, path, base, a.chunks, a.threads)
            cache_p.write_text(json.dumps(cache, indent=1))
        return cache[key]

    def measure(kind, method, path, cpu, preset=None, pred=None, pred_raw=None):
        k = kld_cached(path)
        ks = self_kld(path) if a.self_text else None
        rows.append({"kind": kind, "method": method, "preset": preset, "bytes": path.stat().st_size, "kld": k,
                     "pred": pred, "pred_raw": pred_raw, "cpu_s": cpu, "kld_self": ks})
        print(f"{kind:<16} {method:<11} {preset or '':<8} {path.stat().st_size:>10} B  KLD {k:.5f}"
              + (f"  predicted {pred:.5f}" if pred is not None else "")
              + (f"  self-text KLD {ks:.5f}" if ks is not None else ""), flush=True)

    sizes = {}
    for pr in a.presets:
        out = work / f"lq-{pr}.gguf"
        if not out.exists():
            run([binp / "llama-quantize", f16, out, pr, str(a.threads)])
        sizes[pr] = out.stat().st_size
    # one self-calibration (seeded) serves every allocation and every calibrated file
    from ggufq import calib
    import pickle
    saved = pickle.loads(Path(a.table).read_bytes()) if a.table and Path(a.table).exists() else {}
    c0 = _cpu()
    cal = None
    if a.self_text or any(m != "kquant" or m not in saved for m in a.methods):
        cal = calib.calibrate_folder(a.model, work, a.calib_tokens, jobs=a.jobs, progress=False)
    cpu = {"calibration": _cpu() - c0}
    self_kld = held_out_kld(cal, f16, a.self_text, a.probe_seqs, a.threads) if a.self_text else None
    tables = {}
    kw = {"sets": a.probe_sets} | ({"seqs": a.probe_seqs} if a.probe_seqs else {}) | \
        ({"probe_type": a.probe_type} if a.probe_type else {})
    for m in a.methods:
        c0 = _cpu()
        if m in saved:
            tables[m], cpu[f"allocation {m}"] = saved[m]
            print(f"{m}: table and probe read from {a.table} (allocation CPU {cpu[f'allocation {m}']:.1f} s when made)")
            continue
        opts = Options(method=m, jobs=a.jobs, calibration=cal, progress=False, target_size=min(sizes.values()),
                       alloc_kw=kw)
        tables[m] = allocation(a.model, opts, work)
        cpu[f"allocation {m}"] = _cpu() - c0
        if a.table:
            saved[m] = (tables[m], cpu[f"allocation {m}"])
            Path(a.table).write_bytes(pickle.dumps(saved))
        chk = sorted(v for _, v in tables[m].sample_check())
        if chk:
            print(f"{m}: row-sample estimate / whole tensor at {tables[m].probe.probe_type.name} over {len(chk)} "
                  f"sampled tensors: median "
                  f"{chk[len(chk) // 2]:.3f}, range {chk[0]:.3f} .. {chk[-1]:.3f}")
        if tables[m].probe is not None:
            print(f"{m}: probe KLD at {tables[m].probe.probe_type.name}: " + ", ".join(
                f"{g} {k:.4f}" for g, k in tables[m].probe.kld.items()))
        print(f"{m}: table {tables[m].seconds.get('table', 0):.1f} s, probe {tables[m].seconds.get('probe', 0):.1f} s "
              f"wall; allocation CPU {cpu[f'allocation {m}']:.1f} s", flush=True)

    def write(m, out, **kw):
        c1 = _cpu()
        convert(a.model, out, options=Options(method=m, jobs=a.jobs, progress=False, force=True,
                                              calibration=cal if m != "kquant" else None, **kw))
        return _cpu() - c1

    def predicted(m, path):
        import gguf
        from gguf import GGMLQuantizationType as T
        types = {t.name: T(int(t.tensor_type)) for t in gguf.GGUFReader(path).tensors}
        tb = tables[m]
        raw = sum(float(r.error[r.types.index(types[r.name])]) for r in tb.rows if types[r.name] in r.types)
        return tb.predict(types), raw

    for pr in a.presets:          # size by size, so a partial run has whole comparisons
        measure("llama-quantize", "-", work / f"lq-{pr}.gguf", 0.0, pr, *predicted(a.methods[0], work / f"lq-{pr}.gguf"))
        for m in a.methods:
            table = tables[m]
            al = alloc.resolve(table, sizes[pr])
            types = {e.name: e.qtype for e in al.plan.entries}
            unscaled = sum(float(r.error[r.types.index(types[r.name])]) for r in al.rows)
            out = work / f"gt-{m}-{pr}.gguf"
            measure("ggufq target", m, out, write(m, out, types=types, ftype=pr, quantize_keys=al.metadata()), pr,
                    al.predicted_kld, unscaled)
            if not a.targets_only:
                out = work / f"gq-{m}-{pr}.gguf"
                measure("ggufq preset", m, out, write(m, out, ftype=pr), pr, *predicted(m, out))
            # the same table without the probe's scales / role factors
            if m == a.methods[0] and a.ablation is not None and (not a.ablation or pr in a.ablation):
                for kind, tag, scales in (("target no probe", "noprobe", {g: 1.0 for g in table.scales}),
                                          ("target no roles", "noroles", group_scales(table)),
                                          ("target layer x role", "product", product_scales(table))):
                    if scales is None:
                        continue
                    flat = alloc.resolve(dataclasses.replace(table, scales=scales), sizes[pr])
                    ft = {e.name: e.qtype for e in flat.plan.entries}
                    out = work / f"gt-{tag}-{m}-{pr}.gguf"
                    measure(kind, m, out, write(m, out, types=ft, ftype=pr, quantize_keys=flat.metadata()),
                            pr, table.predict(ft), flat.solution.loss)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    for x in a.extra:             # other files of this model, predicted with the first method's table
        measure("extra", "-", Path(x), 0.0, Path(x).name, *predicted(a.methods[0], Path(x)))
    if cal is not None:
        cal.close()
    print()
    print_table(rows, a.presets, a.methods)
    if a.ablation is not None:
        m = a.methods[0]
        print(f"\nablation ({m} table): | size of | target | target, layer x role fit | target, one scale per layer "
              f"| target, no probe |")
        for pr in (a.ablation or a.presets):
            got = {r["kind"]: r["kld"] for r in rows if r["preset"] == pr and r["method"] == m}
            print(f"| {pr} | " + " | ".join(f"{got[k]:.5f}" if k in got else "-" for k in
                                            ("ggufq target", "target layer x role", "target no roles",
                                             "target no probe")) + " |")
    enc = {r["method"]: r["cpu_s"] for r in rows if r["kind"] == "ggufq preset" and r["preset"] == "Q4_K_M"}
    for m in a.methods:
        line = (f"time ({m}): calibration {cpu['calibration']:.1f} CPU s, allocation (row-sample table + probe + solve) "
                f"{cpu[f'allocation {m}']:.1f} CPU s")
        if m != "kquant" and m in enc:     # kquant's encoder pool workers are not all counted: no ratio for it
            base = enc[m] + cpu["calibration"]
            line += (f", Q4_K_M conversion {base:.1f} CPU s incl. calibration: the allocation adds "
                     f"{cpu[f'allocation {m}'] / max(base, 1e-9):.0%} to it")
        print(line)
    for m in a.methods:
        sel = [r for r in rows if r["pred"] is not None and (r["method"] == m or (r["method"] == "-" and m == a.methods[0]))]
        print(f"rank correlation predicted vs measured KLD ({m}, {len(sel)} files: presets and targets): "
              f"scaled {_spearman([r['pred'] for r in sel], [r['kld'] for r in sel]):.3f}, "
              f"unscaled tr(EHE^T) {_spearman([r['pred_raw'] for r in sel], [r['kld'] for r in sel]):.3f}")
        if a.self_text:
            print(f"  on {a.self_text} held-out self-calibration sequences: scaled "
                  f"{_spearman([r['pred'] for r in sel], [r['kld_self'] for r in sel]):.3f}; measured / predicted: "
                  + ", ".join(f"{r['kind']} {r['preset']} {r['kld'] / r['pred']:.2f} (self-text "
                              f"{r['kld_self'] / r['pred']:.2f})" for r in sel))
        for pr in a.presets:      # at one size: does the prediction order the files as measured?
            same = [r for r in sel if r["preset"] == pr]
            if len(same) >= 2:
                print(f"  at {pr}'s size: " + ", ".join(f"{r['kind']} pred {r['pred']:.4f} meas {r['kld']:.4f}"
                                                        for r in same))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.png:
        plot(rows, a.png, a.label or Path(a.model).name)


def held_out_kld(cal, f16: Path, n: int, probe_seqs, threads: int):
    """``path -> mean KLD`` against the F16 model on ``n`` self-calibration sequences the probe did not decode
    (sequences ``PROBE_SEQS .. PROBE_SEQS + n``; second halves scored, as the probe): how well the prediction
    holds on the text it is calibrated on, apart from the shift to the evaluation text."""
    from ggufq.alloc import probe as P
    first = probe_seqs or P.PROBE_SEQS
    tok = np.asarray(cal.tokens)[first:first + n]
    if len(tok) < n:
        raise SystemExit(f"--self-text {n}: the self-calibration has {len(cal.tokens)} sequences, "
                         f"the probe uses {first}")

    def logits(path):
        w = P._open(Path(path), tok.shape[1], threads)
        try:
            return P._logits(w, tok)
        finally:
            w.close()
    ref = logits(f16)
    return lambda path: P._mean_kld(logits(path), ref, tok)


def group_scales(table) -> dict:
    """The table's scales refitted from the same probe without the role measurements: one scale per
    probed layer (every tensor of a layer weighed alike per unit of tr(E H E^T), as before the role
    sets were added); from a per-tensor probe, each layer's KLD is the sum of its tensors'."""
    from ggufq.alloc import probe as P
    pr = table.probe
    if pr.sets == "tensor":
        kld: dict = {}
        for n, k in pr.kld.items():
            kld[P.probe_group(n)] = kld.get(P.probe_group(n), 0.0) + k
    else:
        kld = {g: k for g, k in pr.kld.items() if not g.startswith("role:")}
    return P.fit_scales(pr.rows, P.probe_group, kld, {})


def product_scales(table):
    """A per-tensor probe's measurements fitted as s[layer] x c[role] (what one scale per tensor adds
    over the layer x role model); None for a layer/role probe (that model is its default)."""
    from ggufq.alloc import probe as P
    return P.product_scales(table.probe) if table.probe.sets == "tensor" else None


def print_table(rows, presets, methods) -> None:
    def get(kind, method, pr):
        return next((r for r in rows if r["kind"] == kind and r["method"] == method and r["preset"] == pr), None)
    head = ["size of", "bytes", "llama-quantize"]
    for m in methods:
        head += [f"ggufq {m}", f"target {m}", "bytes/target", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for pr in presets:
        lq = get("llama-quantize", "-", pr)
        cells = [pr, str(lq["bytes"]), f"{lq['kld']:.5f}"]
        for m in methods:
            g, t = get("ggufq preset", m, pr), get("ggufq target", m, pr)
            cells += [f"{g['kld']:.5f}" if g else "-", f"{t['kld']:.5f}" if t else "-",
                      f"{t['bytes'] / lq['bytes']:.4f}" if t else "-",
                      f"{t['kld'] / lq['kld']:.3f}x" if t else "-"]
        print("| " + " | ".join(cells) + " |")


def plot(rows, png, label) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in rows:
        if r["kind"] == "extra" and r["preset"].startswith("lq-"):     # --extra llama-quantize files
            r = dict(r, kind="llama-quantize", preset=r["preset"][3:].split(".")[0])
        key = r["kind"] if r["kind"] in ("llama-quantize", "extra") else f"{r['kind']} ({r['method']})"
        series.setdefault(key, []).append(r)
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 1e6 for r in rs], [r["kld"] for r in rs], "s" if key == "extra" else "o-",
                label="other files (--extra)" if key == "extra" else key)
        if key == "llama-quantize":
            for r in rs:
                ax.annotate(r["preset"], (r["bytes"] / 1e6, r["kld"]), fontsize=7)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KLD vs F16")
    ax.set_yscale("log")
    ax.set_title(f"{label}: KLD vs size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
