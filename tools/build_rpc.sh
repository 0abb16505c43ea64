#!/usr/bin/env bash
# Build llama.cpp's shared libraries with the RPC backend (-DGGML_RPC=ON) and its `rpc-server`,
# from the llama.cpp source vendored in the llama-cpp-python sdist ggufq is tested against, for
# `ggufq convert --rpc HOST:PORT,...` (calibration forward through rpc-server on other machines)
# and tests/test_rpc.py. Use the result with LLAMA_CPP_LIB_PATH=<LIB_DIR> (llama-cpp-python's own
# override; ggufq's llamalib honours it too); run `<LIB_DIR>/ggml-rpc-server -H HOST -p PORT` on each
# machine that lends its memory (the target is `ggml-rpc-server` in this llama.cpp).
# Usage: tools/build_rpc.sh [LIB_DIR]   (default: $GGUFQ_LLAMA_RPC or ~/.cache/ggufq/llama-rpc)
# About 15-25 minutes on 2 cores; does nothing when the build is already there.
set -euo pipefail
VERSION=0.3.36
OUT="${1:-${GGUFQ_LLAMA_RPC:-$HOME/.cache/ggufq/llama-rpc}}"
if [ -x "$OUT/ggml-rpc-server" ] && ls "$OUT"/libggml-rpc.so* >/dev/null 2>&1 && [ -e "$OUT/libllama.so" ]; then
  echo "llama.cpp with RPC already in $OUT"; exit 0
fi
. "$(dirname "$0")/llama_src.sh"     # WORK, SRC
BUILD="$WORK/build-rpc"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target llama ggml-rpc-server >/dev/null
# the libraries find each other beside themselves ($ORIGIN), not in the build folder: libllama and
# ctypes callers (ggufq.llamalib, the RPC registration) must share one libggml and its backend registry
mkdir -p "$OUT"
cp -a "$BUILD/bin/." "$OUT/"
echo "built libllama + libggml-rpc + rpc-server into $OUT"
