"""Is a tensor's KLD linear in its output error ``tr(E H E^T)`` from the probe's type to the types an
allocation picks? Each named tensor alone quantized to each type (through its row fallback) in an
otherwise F16 model, KLD on the probe's self-calibration sequence(s) (:func:`ggufq.alloc.probe.probe`),
printed as KLD / error per type and relative to one reference type (the allocation's scale assumes
the ratio is the same at every type).

Example (SmolLM2, the 2048-token self-calibration of docs/TARGET_SIZE.md)::

    python -m tools.probe_types --model MODEL_DIR --work SCRATCH --calib-tokens 2048 \\
        --types Q2_K Q3_K IQ4_XS Q4_K Q5_K --tensors blk.11.ffn_down.weight blk.29.ffn_down.weight
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path


def main() -> None:
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from ggufq import calib, vocab as vocabs
    from ggufq.alloc import probe as P
    from ggufq.convert import metadata_for, prepare, write_header
    from tools.pareto import _cpu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True, help="scratch folder")
    ap.add_argument("--types", nargs="+", required=True)
    ap.add_argument("--tensors", nargs="+", required=True)
    ap.add_argument("--ref", default=None, help="type the ratios are relative to (default: the last of --types)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--seqs", type=int, default=P.PROBE_SEQS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    c0 = _cpu()
    cal = calib.calibrate_folder(a.model, work, a.calib_tokens, jobs=1, progress=False)
    p = prepare(a.model)
    add = functools.partial(write_header, p, metadata_for(p), vocabs.load(p.model.path, p.model.config))
    groups = {t.name: [t] for t in p.tensors if t.name in a.tensors}
    missing = set(a.tensors) - set(groups)
    if missing:
        raise SystemExit(f"no tensor {sorted(missing)[0]} in this model")

    def moment(n):
        m = cal.moment(n)
        return None if m is None else np.asarray(m, np.float64)
    out: dict = {}
    for name in a.types:
        res = P.probe(p, groups, lambda n: None, moment, cal.tokens, add, work, jobs=1, probe_type=T[name],
                      seqs=a.seqs)
        for n, e in res.rows:
            out.setdefault(n, {})[name] = {"kld": res.kld[n], "error": e}
    cal.close()
    ref = a.ref or a.types[-1]
    print(f"| tensor | {ref} KLD/error | " + " | ".join(f"{t} / {ref}" for t in a.types) + " |")
    print("|---" * (len(a.types) + 2) + "|")
    for n, v in out.items():
        r = v[ref]["kld"] / v[ref]["error"]
        print(f"| {n} | {r:.3g} | " + " | ".join(f"{v[t]['kld'] / v[t]['error'] / r:.2f}" for t in a.types) + " |")
    print(f"CPU {_cpu() - c0:.1f} s (self-calibration and probes)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
