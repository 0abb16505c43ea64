"""Peak memory, wall time and peak disk of a MoE to Q4_K_M: ggufq in one pass vs llama.cpp's
convert_hf_to_gguf.py (to F16) + llama-quantize, for 8 and 64 experts of the same shape.

    python -m tools.bench_moe_memory                                # hidden 256, 4 layers
    python -m tools.bench_moe_memory --hidden 1024 --layers 8 --experts 8 64 --jobs 2

Models come from tools/synthetic_moe.py (Mixtral-shaped, BF16, 4 shards, kept in --work for reruns;
hidden 1024, 5 layers, 64 experts is 1.04 B parameters, its 8-expert twin 0.16 B). Memory is
measured as tools/bench_memory.py does (max RSS of any one process from wait4, tree PSS sampled
from /proc); CPU is user + system seconds of the tool and the children it reaped; peak disk is the
largest total size of the files directly in --work (outputs, temporary and intermediate files),
sampled every 50 ms during the run (ggufq: its output's temp file, renamed into place; llama.cpp:
the F16 intermediate and the quantized output). Both use the same number of threads (--jobs:
ggufq's encoder processes, llama-quantize's nthread; convert_hf_to_gguf.py has no such option).

On the 16-core machine, one call per expert count keeps each under 10 minutes
(docs/MOE.md lists the whole sequence):

    python -m tools.bench_moe_memory --hidden 1024 --layers 5 --experts 8 --jobs 16 --work /tmp/ggufq-bench
    python -m tools.bench_moe_memory --hidden 1024 --layers 5 --experts 64 --jobs 16 --work /tmp/ggufq-bench
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


from tools.bench_memory import measure, model_bytes
from tools.common import LLAMA_CONVERT, ROOT, child_env, llama_bin, scratch
from tools.synthetic_moe import make_moe

HERE = ROOT / "tools"


class DiskPeak(threading.Thread):
    """The largest total size of the regular files directly in ``folder``, sampled every 50 ms
    from start until ``stop()`` (model folders, which are subfolders, do not count)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.peak, self.done = folder, 0, threading.Event()

    def sample(self) -> None:
        total = 0
        for e in os.scandir(self.folder):
            try:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:      # a temp file renamed between listing and stat
                pass
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def stop(self) -> int:
        self.sample()
        self.done.set()
        self.join()
        return self.peak


def measure_disk(cmd: list[str], folder: Path, env=None) -> dict:
    """:func:`tools.bench_memory.measure` plus ``peak_disk``: the most bytes the run added to ``folder``."""
    base = DiskPeak(folder)
    base.sample()
    d = DiskPeak(folder)
    d.start()
    try:
        m = measure(cmd, env=env)
    finally:
        peak = d.stop()
    return dict(m, peak_disk=peak - base.peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=scratch("ggufq-bench", "GGUFQ_BENCH_DIR"))
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-bin", default=None, help="folder of llama-quantize (default: $GGUFQ_LLAMA_BIN or "
                    "~/.cache/ggufq/llama-bin)")
    a = ap.parse_args(argv)
    if not a.skip_llama:       # before minutes of model making
        bin_dir = llama_bin(a.llama_bin, "llama-quantize")
        if not LLAMA_CONVERT.is_file():
            sys.exit(f"llama.cpp's converter not found at {LLAMA_CONVERT} (set $GGUFQ_LLAMA_CONVERT)")
    a.work.mkdir(parents=True, exist_ok=True)
    env = child_env()
    rows = []
    for x in a.experts:
        d = a.work / f"moe-mixtral-h{a.hidden}-l{a.layers}-x{x}"
        if not (d / "config.json").is_file():
            t0 = time.perf_counter()
            make_moe(d, "mixtral", hidden=a.hidden, ff=a.hidden, layers=a.layers, heads=max(4, a.hidden // 128),
                     kv_heads=max(2, a.hidden // 512), experts=x, active=2, shards=4, seed=1, scale=0.0)
            print(f"made {d.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        from ggufq.convert import prepare
        n_params = prepare(d).n_params
        out = a.work / f"x{x}-ggufq.gguf"
        m = measure_disk([sys.executable, "-m", "ggufq", "convert", str(d), "-o", str(out), "--type", a.type,
                          "-j", str(a.jobs), "-q", "-f"], a.work, env=env)
        rows.append(dict(x=x, tool="ggufq (one pass)", params=n_params, wall=m["wall_s"], cpu=m["cpu_s"],
                         rss=m["max_rss_mib"], pss=m["tree_pss_mib"], disk=m["peak_disk"], out=out.stat().st_size,
                         src=model_bytes(d)))
        out.unlink()
        if a.skip_llama:
            continue
        f16, q = a.work / f"x{x}-llama-F16.gguf", a.work / f"x{x}-llama-{a.type}.gguf"
        c = measure_disk([sys.executable, str(LLAMA_CONVERT), str(d), "--outtype", "f16", "--outfile", str(f16)],
                         a.work, env=env)
        k = measure_disk([str(bin_dir / "llama-quantize"), str(f16), str(q), a.type, str(a.jobs)], a.work)
        rows.append(dict(x=x, tool="convert_hf_to_gguf + llama-quantize", params=n_params,
                         wall=c["wall_s"] + k["wall_s"], cpu=c["cpu_s"] + k["cpu_s"],
                         rss=max(c["max_rss_mib"], k["max_rss_mib"]),
                         pss=max(c["tree_pss_mib"], k["tree_pss_mib"]), disk=max(c["peak_disk"], f16.stat().st_size + k["peak_disk"]),
                         out=q.stat().st_size, src=model_bytes(d),
                         detail=f"convert {c['wall_s']:.1f} s / {c['max_rss_mib']:.0f} MiB, quantize "
                                f"{k['wall_s']:.1f} s / {k['max_rss_mib']:.0f} MiB"))
        f16.unlink()
        q.unlink()
    print(f"\n{a.type}, Mixtral-shaped synthetic MoE (hidden {a.hidden}, {a.layers} layers, expert ff {a.hidden}, "
          f"2 active), {a.jobs} threads/processes each, {os.cpu_count()} CPUs\n")
    print("| experts | params | BF16 in | tool | wall | CPU (user+sys) | max RSS | tree PSS | peak disk | output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['x']} | {r['params'] / 1e6:.0f} M | {r['src'] / 2**20:.0f} MiB | {r['tool']} | {r['wall']:.1f} s | "
              f"{r['cpu']:.1f} s | {r['rss']:.0f} MiB | {r['pss']:.0f} MiB | {r['disk'] / 2**20:.0f} MiB | "
              f"{r['out'] / 2**20:.0f} MiB |")
    for r in rows:
        if "detail" in r:
            print(f"- {r['x']} experts, llama.cpp: {r['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
