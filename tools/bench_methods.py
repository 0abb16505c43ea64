#!/usr/bin/env python3
"""Wall time and peak memory of `ggufq convert` per --method (same type, same file size).

Each run is a fresh `python -m ggufq convert MODEL --type T --method M -j JOBS` process;
peak memory is the largest max-RSS of that process and of its encoder processes
(getrusage of the children, which is what /usr/bin/time -v reports as well).

  python -m tools.bench_methods MODEL --type Q4_K_M --methods kquant hqq hqq:0 --work /tmp/b

`hqq:0` = --method hqq (= calibrated) --calib-tokens 0 (data-free); `hqq:4096` = 4096 calibration tokens.
Prints a markdown table: seconds, x the first method's time, peak RSS, output bytes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from tools.common import child_env



def run(model, out, qtype, method, jobs, extra=()):
    m, _, tokens = method.partition(":")
    cmd = [sys.executable, "-m", "ggufq", "convert", str(model), "-o", str(out), "--type", qtype,
           "--method", m, "-j", str(jobs), "-f"]
    if tokens:
        cmd += ["--calib-tokens", tokens]
    from ggufq.quant import methods
    if methods.get(m).moments:
        cmd += list(extra)
    env = child_env()
    t0 = time.monotonic()
    # a fresh child per run: RUSAGE_CHILDREN's maxrss is the max over every waited-for descendant,
    # so measure in a grandchild wrapper to keep the runs apart
    wrapper = ("import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,file=sys.stderr);sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    secs = time.monotonic() - t0
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    lines = r.stderr.strip().splitlines()
    rss_kib = int(lines[-1])
    note = next((ln for ln in lines if ln.startswith("self-calibration:")), "")
    return secs, rss_kib / 1024, out.stat().st_size, note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--methods", nargs="+", default=["kquant", "hqq", "hqq:0"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--work", required=True)
    ap.add_argument("--calib-cache", help="passed to the self-calibrated methods (e.g. 8G)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in a.methods:
        out = work / f"{m.replace(':', '-')}-{a.type}.gguf"
        secs, rss, size, note = run(a.model, out, a.type, m, a.jobs,
                               ["--calib-cache", a.calib_cache] if a.calib_cache else [])
        rows.append((m, secs, rss, size, note))
        print(f"  {m:12s} {secs:8.1f} s  {rss:7.0f} MiB  {size} B  {note}", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"model {Path(a.model).name}, --type {a.type}, -j {a.jobs}, {os.cpu_count()} CPUs"
          + (f", --calib-cache {a.calib_cache}" if a.calib_cache else ""))
    print("| method | seconds | x " + rows[0][0] + " | peak RSS MiB | bytes | self-calibration |")
    print("|---|---|---|---|---|---|")
    for m, secs, rss, size, note in rows:
        label = m if ":" not in m else f"{m.split(':')[0]} --calib-tokens {m.split(':')[1]}"
        print(f"| {label} | {secs:.1f} | {secs / base:.2f} | {rss:.0f} | {size} | "
              f"{note.removeprefix('self-calibration: ')} |")


if __name__ == "__main__":
    main()
