#!/usr/bin/env bash
# The issue-11 MoE benchmark (tools/bench_moe_memory.py: ggufq one pass vs convert_hf_to_gguf.py +
# llama-quantize, Q4_K_M, RSS / CPU / wall / peak disk) at the ~1B-parameter size, on a machine with
# no internet (the 16-core device box): installs the carried wheels, builds llama.cpp's tools from the
# carried slim source when they are not there yet, then runs one expert count.
#
# Usage: tools/bench_moe_device.sh EXPERTS [JOBS] [HIDDEN] [LAYERS]    (defaults: 16 jobs, 1024, 5)
# Needs, in the checkout (ignored folders, named in the call's carry):
#   .whl/   gguf-*.whl (py3-none-any; numpy, pyyaml and tqdm are on the box)
#   .bench/ llama-tools-src.tar.gz   (tools/make_llama_tools_src.sh .bench)
# Writes the table to stdout and to $OUT/bench_moe_x<EXPERTS>.md when $OUT is set. Keeps the models
# and the built tools under /tmp and ~/.cache for a next call while the machine stays up.
set -euo pipefail
X="${1:?usage: tools/bench_moe_device.sh EXPERTS [JOBS] [HIDDEN] [LAYERS]}"
JOBS="${2:-16}"
HIDDEN="${3:-1024}"
LAYERS="${4:-5}"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/gguf ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
SRC="${GGUFQ_LLAMA_SRC:-$HOME/.cache/ggufq/llama-src}"
if [ ! -d "$SRC/llama_cpp_python-0.3.36/vendor/llama.cpp" ]; then
  mkdir -p "$SRC"
  tar xzf .bench/llama-tools-src.tar.gz -C "$SRC"
fi
t0=$(date +%s)
bash tools/build_llama_tools.sh
echo "llama.cpp tools ready after $(( $(date +%s) - t0 )) s" >&2
LOG="${OUT:-/tmp}/bench_moe_x$X.md"
PYTHONUNBUFFERED=1 "$PY" -m tools.bench_moe_memory --hidden "$HIDDEN" --layers "$LAYERS" --experts "$X" \
  --jobs "$JOBS" --work "${GGUFQ_BENCH_DIR:-/tmp/ggufq-bench}" | tee "$LOG"
