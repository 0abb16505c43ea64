"""One pass vs two tools: `ggufq convert --type Q4_K_M` against llama.cpp's
`convert_hf_to_gguf.py --outtype f16` followed by `llama-quantize ... Q4_K_M`.

    python -m tools.bench_pipeline MODEL_DIR [--type Q4_K_M] [--jobs N] [--work DIR]

Reports wall time of each step, the peak disk space each pipeline needs (largest sum of
files alive at once: ggufq writes only its output; llama.cpp keeps the F16 file until the
quantized one is written), and whether the two outputs hold the same tensors
(type and bytes) and metadata. Make a model with `python -m tools.make_synthetic DIR --size 1B`.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from tools.common import LLAMA_BIN, LLAMA_CONVERT, ROOT, scratch, timed



def run(cmd: list[str], env=None) -> float:
    """Wall seconds of a command (memory is tools/bench_memory.py's job)."""
    return timed(cmd, env=env)


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    import gguf
    import numpy as np
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    same = 0
    for t in ra.tensors:
        u = tb.get(t.name)
        if u is not None and u.tensor_type == t.tensor_type and np.array_equal(
                np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            same += 1
    return same, len(ra.tensors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=scratch("ggufq-bench-pipeline", "GGUFQ_BENCH_PIPELINE_DIR"))
    ap.add_argument("--convert-script", type=Path, default=LLAMA_CONVERT)
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    a = ap.parse_args()
    if not a.convert_script.is_file():
        sys.exit(f"no convert_hf_to_gguf.py at {a.convert_script} (run tools/build_llama_tools.sh, or --convert-script)")
    quantize = a.llama_bin / "llama-quantize"
    if not quantize.exists():
        sys.exit(f"no llama-quantize in {a.llama_bin} (run tools/build_llama_tools.sh)")
    a.work.mkdir(parents=True, exist_ok=True)
    ours, f16, theirs = a.work / "ggufq.gguf", a.work / "llama-f16.gguf", a.work / "llama-q.gguf"
    for p in (ours, f16, theirs):
        p.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    t_ours = run([sys.executable, "-m", "ggufq", "convert", str(a.model), "-o", str(ours),
                            "--type", a.type, "--jobs", str(a.jobs), "-q"], env=env)
    disk_ours = ours.stat().st_size
    t_conv = run([sys.executable, str(a.convert_script), str(a.model), "--outtype", "f16",
                            "--outfile", str(f16)])
    t_quant = run([str(quantize), str(f16), str(theirs), a.type, str(a.jobs)])
    disk_theirs = f16.stat().st_size + theirs.stat().st_size
    same, n = same_tensors(ours, theirs)

    mib = 2 ** 20
    print(f"| pipeline ({a.model.name}, {a.type}, {a.jobs} jobs) | wall s | peak disk MiB | output MiB |")
    print("|---|---|---|---|")
    print(f"| ggufq convert --type {a.type} | {t_ours:.1f} | {disk_ours / mib:.0f} | {ours.stat().st_size / mib:.0f} |")
    print(f"| convert_hf_to_gguf.py f16 + llama-quantize | {t_conv:.1f} + {t_quant:.1f} = {t_conv + t_quant:.1f} "
          f"| {disk_theirs / mib:.0f} | {theirs.stat().st_size / mib:.0f} |")
    print(f"\ntensors identical (type and bytes): {same}/{n}")
    for p in (ours, f16, theirs):
        p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
