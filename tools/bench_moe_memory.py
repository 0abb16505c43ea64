"""Peak memory, wall time and peak disk of a MoE to Q4_K_M: ggufq in one pass vs llama.cpp's
convert_hf_to_gguf.py (to F16) + llama-quantize, for 8 and 64 experts of the same shape.

    python -m tools.bench_moe_memory                                # hidden 256, 4 layers
    python -m tools.bench_moe_memory --hidden 1024 --layers 8 --experts 8 64 --jobs 2

Models come from tools/synthetic_moe.py (Mixtral-shaped, BF16, 4 shards, kept in --work for reruns);
memory is measured as tools/bench_memory.py does (max RSS of any one process from wait4, tree PSS
sampled from /proc). Peak disk: ggufq writes only its output (a temp file renamed into place);
the llama.cpp pipeline holds the F16 intermediate and the Q4_K_M output at once. Both use the same
number of threads (--jobs: ggufq's encoder processes, llama-quantize's nthread).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from tools.bench_memory import measure, model_bytes
from tools.common import LLAMA_BIN, LLAMA_CONVERT, ROOT, child_env, scratch
from tools.synthetic_moe import make_moe

HERE = ROOT / "tools"



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=scratch("ggufq-bench", "GGUFQ_BENCH_DIR"))
    ap.add_argument("--skip-llama", action="store_true")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    env = child_env()
    rows = []
    for x in a.experts:
        d = a.work / f"moe-mixtral-h{a.hidden}-l{a.layers}-x{x}"
        if not (d / "config.json").is_file():
            make_moe(d, "mixtral", hidden=a.hidden, ff=a.hidden, layers=a.layers, heads=max(4, a.hidden // 128),
                     kv_heads=max(2, a.hidden // 512), experts=x, active=2, shards=4, seed=1, scale=0.0)
        from ggufq.convert import prepare
        n_params = prepare(d).n_params
        out = a.work / f"x{x}-ggufq.gguf"
        m = measure([sys.executable, "-m", "ggufq", "convert", str(d), "-o", str(out), "--type", a.type,
                     "-j", str(a.jobs), "-q", "-f"], env=env)
        rows.append(dict(x=x, tool="ggufq (one pass)", params=n_params, wall=m["wall_s"], rss=m["max_rss_mib"],
                         pss=m["tree_pss_mib"], disk=out.stat().st_size, out=out.stat().st_size, src=model_bytes(d)))
        out.unlink()
        if a.skip_llama:
            continue
        f16, q = a.work / f"x{x}-llama-F16.gguf", a.work / f"x{x}-llama-{a.type}.gguf"
        c = measure([sys.executable, str(LLAMA_CONVERT), str(d), "--outtype", "f16", "--outfile", str(f16)], env=env)
        k = measure([str(LLAMA_BIN / "llama-quantize"), str(f16), str(q), a.type, str(a.jobs)])
        rows.append(dict(x=x, tool="convert_hf_to_gguf + llama-quantize", params=n_params,
                         wall=c["wall_s"] + k["wall_s"], rss=max(c["max_rss_mib"], k["max_rss_mib"]),
                         pss=max(c["tree_pss_mib"], k["tree_pss_mib"]), disk=f16.stat().st_size + q.stat().st_size,
                         out=q.stat().st_size, src=model_bytes(d),
                         detail=f"convert {c['wall_s']:.1f} s / {c['max_rss_mib']:.0f} MiB, quantize "
                                f"{k['wall_s']:.1f} s / {k['max_rss_mib']:.0f} MiB"))
        f16.unlink()
        q.unlink()
    print(f"\n{a.type}, Mixtral-shaped synthetic MoE (hidden {a.hidden}, {a.layers} layers, expert ff {a.hidden}, "
          f"2 active), {a.jobs} threads/processes each, {os.cpu_count()} CPUs\n")
    print("| experts | params | BF16 in | tool | wall | max RSS | tree PSS | peak disk | output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['x']} | {r['params'] / 1e6:.0f} M | {r['src'] / 2**20:.0f} MiB | {r['tool']} | {r['wall']:.1f} s | "
              f"{r['rss']:.0f} MiB | {r['pss']:.0f} MiB | {r['disk'] / 2**20:.0f} MiB | {r['out'] / 2**20:.0f} MiB |")
    for r in rows:
        if "detail" in r:
            print(f"- {r['x']} experts, llama.cpp: {r['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
