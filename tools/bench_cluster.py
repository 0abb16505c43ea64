"""A Ray cluster of local processes vs `--jobs N` vs llama.cpp's convert + llama-quantize.

    python -m tools.bench_cluster [--size 1B|small] [--cpus N] [--nodes 4] [--type Q4_K_M] [--work DIR]

On a dense synthetic Llama (tools/make_synthetic.py, 1B) and a synthetic Qwen3-MoE of ~2B parameters
(tools/synthetic_moe.py: hidden 2048, 6 layers, 64 experts of width 640), made in --work when absent,
each of:

* ggufq convert --executor ray://ADDR on a Ray cluster started here (``ray.cluster_utils``: --nodes
  raylets of --cpus/--nodes CPUs each, all on this machine; the driver reads nothing but the header);
* ggufq convert --jobs --cpus (local processes);
* llama.cpp's convert_hf_to_gguf.py --outtype f16 then llama-quantize TYPE --cpus threads.

Columns: wall seconds, the driver's peak RSS (sampled VmRSS of the ggufq / convert_hf_to_gguf process
itself, every 50 ms), the peak RSS of its local process tree (the --jobs workers; Ray's workers are
the raylets' children, not the driver's), and encode rate (weights per second per CPU). The Ray and
--jobs files are compared byte for byte. `--size small` makes toy models (a 2-layer 0.25B Llama and a
2-layer MoE) that prove the script on a laptop. The cluster is shut down at the end, whatever happens.
Prints a markdown table (docs/CLUSTER.md).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools.common import LLAMA_BIN, LLAMA_CONVERT, ROOT, scratch

# Qwen3-MoE's tokenizer (151669 ids): the embedding and output are 0.62B of the 1B size's 2.2B
MOE = {"1B": ["--hidden", "2048", "--layers", "6", "--heads", "16", "--ff", "640", "--experts", "64",
              "--active", "8", "--shards", "4"],
       "small": ["--hidden", "256", "--layers", "2", "--heads", "4", "--ff", "256", "--experts", "16",
                 "--active", "4"]}
DENSE = {"1B": ["--size", "1B"], "small": ["--size", "0.25B", "--layers", "2", "--vocab", "32000"]}


def _kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list, env=None) -> dict:
    """Wall seconds, the process's own peak RSS and its tree's (tools.bench_memory.Sampler), MiB."""
    from tools.bench_memory import Sampler
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    tree = Sampler(p.pid)
    tree.start()
    peak = [0]
    stop = threading.Event()

    def own():
        while not stop.is_set():
            peak[0] = max(peak[0], _kib(p.pid))
            stop.wait(0.05)
    t = threading.Thread(target=own, daemon=True)
    t.start()
    err = p.stderr.read()
    p.wait()
    wall = time.perf_counter() - t0
    stop.set()
    tree.done.set()
    t.join()
    tree.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} ... failed ({p.returncode}):\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    return {"wall": wall, "rss": peak[0] / 1024, "tree": tree.peak_rss / 1024}


def models(work: Path, size: str, which=("dense", "moe")) -> dict:
    dense, moe = work / f"dense-{size}", work / f"moe-{size}"
    if "dense" in which and not (dense / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tools.make_synthetic", dense, *DENSE[size], "-q"], check=True, cwd=ROOT)
    if "moe" in which and not (moe / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tools.synthetic_moe", moe, "--arch", "qwen3moe", *MOE[size]],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {k: v for k, v in (("dense", dense), ("moe", moe)) if k in which}


def n_weights(model: Path) -> int:
    from ggufq.convert import prepare
    return prepare(model).n_params


def _row(label, name, m, n, cpus, note) -> str:
    return (f"| {label} | {name} | {m['wall']:.1f} | {m['rss']:.0f} | {m['tree']:.0f} | "
            f"{n / m['wall'] / cpus / 1e6:.2f} | {note} |")


def main() -> int:
    """Long because one table of three pipelines on two models, with the cluster's life around them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["1B", "small"], default="1B")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for each pipeline (default: all)")
    ap.add_argument("--nodes", type=int, default=4, help="raylets of the local Ray cluster (CPUs split evenly)")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--work", type=Path, default=scratch("ggufq-bench-cluster", "GGUFQ_BENCH_CLUSTER_DIR"))
    ap.add_argument("--convert-script", type=Path, default=LLAMA_CONVERT)
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("--skip-llama", action="store_true", help="leave out convert_hf_to_gguf + llama-quantize")
    ap.add_argument("--models", nargs="+", choices=["dense", "moe"], default=["dense", "moe"],
                    help="which of the two models (default both; one each fits a 10-minute call better)")
    a = ap.parse_args()
    quantize = a.llama_bin / "llama-quantize"
    if not a.skip_llama and not (a.convert_script.is_file() and quantize.exists()):
        sys.exit(f"no convert_hf_to_gguf.py / llama-quantize ({a.convert_script}, {a.llama_bin}): "
                 "tools/build_llama_tools.sh, or --skip-llama")
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        sys.exit("ray is not installed: pip install 'ggufq[ray]'")
    a.work.mkdir(parents=True, exist_ok=True)
    ms = models(a.work, a.size, a.models)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    per = max(1, a.cpus // a.nodes)
    rows = []
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]          # the raylets' workers import this ggufq
    c = None
    try:
        t0 = time.perf_counter()
        c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=per, include_dashboard=False))
        for _ in range(a.nodes - 1):
            c.add_node(num_cpus=per)
        c.wait_for_nodes(300)
        t_up = time.perf_counter() - t0
        for kind, model in ms.items():
            n = n_weights(model)
            out_r, out_j = a.work / "ray.gguf", a.work / "jobs.gguf"
            f16, theirs = a.work / "llama-f16.gguf", a.work / "llama-q.gguf"
            for p in (out_r, out_j, f16, theirs):
                p.unlink(missing_ok=True)
            ggufq = [sys.executable, "-m", "ggufq", "convert", model, "-t", a.type, "-q"]
            r = measure([*ggufq, "-o", out_r, "--executor", f"ray://{c.address}"], env)
            j = measure([*ggufq, "-o", out_j, "--jobs", a.cpus], env)
            same = filecmp.cmp(out_r, out_j, shallow=False)
            label = f"{kind} {n / 1e9:.2f}B"
            rows.append((label, f"ggufq --executor ray ({a.nodes} nodes x {per} CPUs)", r, n, a.nodes * per,
                         "identical to --jobs" if same else "DIFFERENT from --jobs"))
            rows.append((label, f"ggufq --jobs {a.cpus}", j, n, a.cpus, ""))
            print("row:", _row(*rows[-2]), "\nrow:", _row(*rows[-1]), flush=True)
            if not a.skip_llama:
                cv = measure([sys.executable, a.convert_script, model, "--outtype", "f16", "--outfile", f16], env)
                q = measure([quantize, f16, theirs, a.type, a.cpus])
                both = {"wall": cv["wall"] + q["wall"], "rss": max(cv["rss"], q["rss"]), "tree": max(cv["tree"], q["tree"])}
                rows.append((label, f"convert_hf_to_gguf f16 + llama-quantize {a.cpus} thr "
                             f"({cv['wall']:.1f} + {q['wall']:.1f} s)", both, n, a.cpus, ""))
                print("row:", _row(*rows[-1]), flush=True)
            for p in (out_r, out_j, f16, theirs):
                p.unlink(missing_ok=True)
    finally:
        if c is not None:
            c.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    print(f"{a.type}, {a.cpus} CPUs per pipeline (os.cpu_count() = {os.cpu_count()}); "
          f"Ray cluster start-up {t_up:.1f} s (not counted)\n")
    print("| model | pipeline | wall s | driver peak RSS MiB | local tree peak RSS MiB | M weights/s per CPU | note |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(*row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
