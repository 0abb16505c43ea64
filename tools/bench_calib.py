#!/usr/bin/env python3
"""llama.cpp's calibrated path vs ``ggufq convert --method calibrated``, side by side in one run.

llama.cpp:  F16 GGUF (ggufq's converter, byte-identical to convert_hf_to_gguf.py)
            -> llama-imatrix over TOKENS tokens of TEXT (chunks of 512)
            -> llama-quantize --imatrix
ggufq:      ggufq convert --method calibrated (the model writes TOKENS tokens itself through
            llama-cpp-python, moments collected while it writes, error-feedback rounding)

Same threads (-t / -j JOBS) for every step. Per step: wall and CPU seconds (user + system of the
process tree: steadier than wall time on a shared machine), peak RSS (the largest
max-RSS of the process tree, as /usr/bin/time -v reports), and peak disk of the work folder
(sampled every 0.1 s, so brief peaks may be missed; the ggufq row also reports the temporary
model and moment scratch it wrote). The load average is printed beside the table: on a
shared machine compare ratios from one run.

  python -m tools.bench_calib MODEL --text TEXT --type Q4_K_M --jobs 2 --work /tmp/bc [--gpu-layers -1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from tools.common import child_env

# runs the command, then writes "maxrss_kib cpu_seconds" of its process tree to the file argv[1]: read from
# a file, not from the log, which llama.cpp's asynchronous logger can cut short
WRAP = ("import resource,subprocess,sys;r=subprocess.run(sys.argv[2:]);u=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "open(sys.argv[1],'w').write(f'{u.ru_maxrss} {u.ru_utime+u.ru_stime}\\n');sys.exit(r.returncode)")


def du(path: Path) -> int:
    n = 0
    for dp, _, files in os.walk(path):
        for f in files:
            try:
                n += os.lstat(os.path.join(dp, f)).st_blocks * 512
            except OSError:
                pass
    return n


def timed(cmd, work: Path, env=None, tries: int = 3):
    """(seconds, CPU seconds, peak RSS MiB, peak disk of work MiB, stdout + stderr); a run whose
    figures did not come back is run again (``tries`` times in all)."""
    for _ in range(tries):
        got = _timed_once(cmd, work, env)
        if got is not None:
            return got
        print(f"  (no figures from {Path(str(cmd[0])).name}: running it again)", file=sys.stderr, flush=True)
    sys.exit(f"no figures after {tries} runs: {' '.join(map(str, cmd))}")


def _timed_once(cmd, work: Path, env):
    figs = work.parent / f".{work.name}.figures"
    figs.unlink(missing_ok=True)
    peak = [du(work)]
    stop = threading.Event()

    def poll():
        while not stop.wait(0.1):
            peak[0] = max(peak[0], du(work))
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", WRAP, str(figs), *map(str, cmd)], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL)
    secs = time.monotonic() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], du(work))
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    try:
        rss, cpu = figs.read_text().split()
    except (OSError, ValueError):
        return None
    finally:
        figs.unlink(missing_ok=True)
    return secs, float(cpu), int(rss) / 1024, peak[0] / (1 << 20), r.stdout + r.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True, help="text for llama-imatrix")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--gpu-layers", type=int, default=0, help="-ngl for llama-imatrix and ggufq (-1: all)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--llama-bin", default=os.environ.get("GGUFQ_LLAMA_BIN", str(Path.home() / ".cache/ggufq/llama-bin")))
    ap.add_argument("--skip-llama", action="store_true", help="only the ggufq row")
    ap.add_argument("--skip-ggufq", action="store_true", help="only llama.cpp's rows")
    ap.add_argument("--omp-active", action="store_true",
                    help="leave OMP_WAIT_POLICY unset for llama.cpp's tools (default: passive, as ggufq's worker "
                         "runs: OpenMP threads spinning between graph computes burn a loaded machine's cores)")
    a = ap.parse_args()
    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    binp = Path(a.llama_bin)
    env = child_env()
    if not a.omp_active:
        env.setdefault("OMP_WAIT_POLICY", "passive")
    a.omp = env.get("OMP_WAIT_POLICY", "unset")       # (ggufq's worker sets passive unless told otherwise)
    ggufq = [sys.executable, "-m", "ggufq"]
    ngl = str(a.gpu_layers if a.gpu_layers >= 0 else 999)
    rows = []
    load0 = os.getloadavg()
    if not a.skip_llama:
        f16, im, lq = work / "f16.gguf", work / "imatrix.gguf", work / f"llama-{a.type}.gguf"
        steps = [("F16 GGUF (ggufq convert)", [*ggufq, "convert", a.model, "-o", f16, "--type", "F16", "-j", a.jobs, "-q"]),
                 ("llama-imatrix", [binp / "llama-imatrix", "-m", f16, "-f", a.text, "-o", im, "-c", 512,
                                    "--chunks", a.tokens // 512, "-t", a.jobs, "-ngl", ngl, "--no-ppl"]),
                 ("llama-quantize --imatrix", [binp / "llama-quantize", "--imatrix", im, f16, lq, a.type, a.jobs])]
        tot = [0.0, 0.0, 0.0, 0.0]
        for label, cmd in steps:
            s, c, r, d, _ = timed(cmd, work, env)
            rows.append(("llama.cpp", label, s, c, r, d, ""))
            tot = [tot[0] + s, tot[1] + c, max(tot[2], r), max(tot[3], d)]
            print(f"  {label:28s} {s:8.1f} s {c:8.1f} cpu-s {r:7.0f} MiB {d:7.0f} MiB", file=sys.stderr, flush=True)
        rows.append(("llama.cpp", "**total**", *tot, ""))
        for f in (f16, im, lq):
            f.unlink(missing_ok=True)
    if a.skip_ggufq:
        _table(a, rows, load0)
        return
    out = work / f"ggufq-{a.type}.gguf"
    s, c, r, d, log = timed([*ggufq, "convert", a.model, "-o", out, "--type", a.type, "--method", "calibrated",
                          "--calib-tokens", a.tokens, "-j", a.jobs, "--gpu-layers", a.gpu_layers], work, env)
    note = next((ln.removeprefix("self-calibration: ") for ln in log.splitlines() if ln.startswith("self-calibration:")), "")
    rows.append(("ggufq", "**convert --method calibrated**", s, c, r, d, note))
    print(f"  ggufq {s:8.1f} s {c:8.1f} cpu-s {r:7.0f} MiB {d:7.0f} MiB  {note}", file=sys.stderr, flush=True)
    _table(a, rows, load0)


def _table(a, rows, load0):
    load1 = os.getloadavg()
    print(f"model {Path(a.model).name}, --type {a.type}, {a.tokens} calibration tokens, threads/-j {a.jobs}, "
          f"-ngl {a.gpu_layers}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY for llama.cpp's "
          f"tools {a.omp}; load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print("| path | step | wall s | CPU s | peak RSS MiB | peak disk MiB | notes |")
    print("|---|---|---|---|---|---|---|")
    for who, step, s, c, r, d, n in rows:
        print(f"| {who} | {step} | {s:.1f} | {c:.1f} | {r:.0f} | {d:.0f} | {n} |")
    if not (a.skip_llama or a.skip_ggufq):
        lt = next(x for x in rows if x[1] == "**total**")
        print(f"\nggufq / llama.cpp: wall {rows[-1][2] / lt[2]:.2f}x, CPU {rows[-1][3] / lt[3]:.2f}x")


if __name__ == "__main__":
    main()
