#!/usr/bin/env bash
# Build llama.cpp's own CLI tools (llama-quantize, llama-perplexity, llama-imatrix,
# llama-gguf-split) from the llama.cpp source vendored in the llama-cpp-python sdist
# of the version ggufq is tested against, for side-by-side benchmarks and parity tests.
# Usage: tools/build_llama_tools.sh [BIN_DIR]   (default: $GGUFQ_LLAMA_BIN or ~/.cache/ggufq/llama-bin)
# About 4-7 minutes on 2 cores; does nothing when the tools are already there.
set -euo pipefail
VERSION=0.3.36
BIN="${1:-${GGUFQ_LLAMA_BIN:-$HOME/.cache/ggufq/llama-bin}}"
TOOLS=(llama-quantize llama-perplexity llama-imatrix llama-gguf-split)
have=1
for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || have=0; done
if [ "$have" = 1 ]; then echo "llama.cpp tools already in $BIN"; exit 0; fi
. "$(dirname "$0")/llama_src.sh"     # WORK, SRC
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$WORK/build" -j"$(nproc)" --target "${TOOLS[@]}" >/dev/null
mkdir -p "$BIN"
cp -a "$WORK/build/bin/." "$BIN/"
echo "built ${TOOLS[*]} into $BIN"
