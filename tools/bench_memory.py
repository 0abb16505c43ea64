"""Peak memory and wall time of `ggufq convert` vs llama.cpp's convert_hf_to_gguf.py, by model size.

    python -m tools.bench_memory                              # 0.25B, 0.5B, 1B synthetic Llamas, Q8_0
    python -m tools.bench_memory --sizes 1B --work /tmp/bench --type Q8_0 --jobs 2
    python -m tools.bench_memory --sizes 1B --arch qwen3 gemma3 --type Q4_K_M --skip-llama

For each size, makes the synthetic model (tools/make_synthetic.py, kept in --work for
reruns) and converts it once with each tool, deleting each output after measuring it.
Memory figures:

- max RSS: the largest resident set of any single process of the run, from the kernel
  (wait4's ru_maxrss, which covers reaped child processes too);
- tree RSS / tree PSS: the highest sum over the whole process tree (ggufq's encoder
  processes included), sampled every 50 ms from /proc; PSS splits pages shared between
  forked processes, so it is the fairer total.

Mapped shard pages a tool touches count in its RSS (llama.cpp's converter mmaps the
safetensors; ggufq reads row ranges with pread, which goes through the page cache and is
not counted). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from tools.common import LLAMA_CONVERT, OUTTYPE, ROOT, child_env, scratch



def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(self.every)


def measure(cmd: list[str], env=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    s = Sampler(p.pid)
    s.start()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    s.done.set()
    s.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "max_rss_mib": ru.ru_maxrss / 1024, "tree_rss_mib": s.peak_rss / 1024,
            "tree_pss_mib": s.peak_pss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def ensure_model(work: Path, size: str, arch: str = "llama") -> Path:
    d = work / f"synthetic-{arch}-{size}"
    if not (d / "config.json").is_file():
        extra = [] if arch == "llama" else ["--arch", arch]
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(d), "--size", size, "-q",
                        *extra], check=True)
    return d


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", nargs="+", default=["0.25B", "0.5B", "1B"], choices=["0.25B", "0.5B", "1B"])
    ap.add_argument("--type", default="Q8_0",
                    help=f"ggufq's --type (default Q8_0); llama.cpp's converter writes only {', '.join(sorted(OUTTYPE))}, "
                         "other types (Q4_K_M ...) need --skip-llama")
    ap.add_argument("--jobs", type=int, default=2, help="ggufq encoder processes (default 2)")
    ap.add_argument("--work", type=Path, default=scratch("ggufq-bench", "GGUFQ_BENCH_DIR"),
                    help="where the synthetic models and outputs go (env GGUFQ_BENCH_DIR)")
    ap.add_argument("--llama-convert", type=Path, default=LLAMA_CONVERT,
                    help="llama.cpp's convert_hf_to_gguf.py (env GGUFQ_LLAMA_CONVERT); needs torch")
    ap.add_argument("--skip-llama", action="store_true", help="measure ggufq only")
    ap.add_argument("--arch", nargs="+", default=["llama"],
                    help="synthetic families (llama; with --sizes 1B also qwen3, gemma3: tools/synthetic_archs.py)")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    run_llama = not a.skip_llama
    if run_llama and a.type not in OUTTYPE:
        ap.error(f"--type {a.type}: llama.cpp's converter writes only {', '.join(sorted(OUTTYPE))}; add --skip-llama")
    if run_llama and not a.llama_convert.is_file():
        print(f"bench_memory: llama.cpp's converter not found at {a.llama_convert}; "
              f"pass --llama-convert or --skip-llama", file=sys.stderr)
        return 2
    env = child_env()
    results = []
    for size, arch in [(s_, a_) for a_ in a.arch for s_ in a.sizes]:
        d = ensure_model(a.work, size, arch)
        out = a.work / f"out-{size}.gguf"
        runs = [("ggufq", [sys.executable, "-m", "ggufq", "convert", str(d), "-o", str(out), "--type", a.type,
                           "-j", str(a.jobs), "-q", "-f"])]
        if run_llama:
            runs.append(("llama.cpp", [sys.executable, str(a.llama_convert), str(d), "--outtype",
                                       OUTTYPE[a.type], "--outfile", str(out)]))
        for tool, cmd in runs:
            m = measure(cmd, env=env)
            m.update(size=size if arch == "llama" else f"{arch} {size}", tool=tool, model_gib=model_bytes(d) / 2**30, out_gib=out.stat().st_size / 2**30)
            out.unlink()
            results.append(m)
            print(f"{size} {tool}: {m['wall_s']:.1f} s, max RSS {m['max_rss_mib']:.0f} MiB, "
                  f"tree PSS {m['tree_pss_mib']:.0f} MiB", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    print(f"\n{a.type}, ggufq -j {a.jobs}, {os.cpu_count()} CPUs\n")
    print("| size | BF16 in | tool | wall | max RSS | tree RSS | tree PSS | output |")
    print("|---|---|---|---|---|---|---|---|")
    for m in results:
        print(f"| {m['size']} | {m['model_gib']:.2f} GiB | {m['tool']} | {m['wall_s']:.1f} s | "
              f"{m['max_rss_mib']:.0f} MiB | {m['tree_rss_mib']:.0f} MiB | {m['tree_pss_mib']:.0f} MiB | "
              f"{m['out_gib']:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
