#!/usr/bin/env bash
# A slim llama.cpp source tree for a machine without internet (the 16-core device box) that must
# build llama.cpp's CLI tools (tools/build_llama_tools.sh) and run its convert_hf_to_gguf.py for the
# side-by-side benchmarks (tools/bench_moe_memory.py, tools/bench_memory.py).
#
# Unlike tools/make_slim_sdist.sh (libraries for llama-cpp-python: drops the CLI tools, gguf-py and
# the converter), this keeps vendor/llama.cpp's CMake tree with every tool directory that
# tools/CMakeLists.txt enters, convert_hf_to_gguf.py, conversion/ and gguf-py/; it drops the vocab
# models, docs, media, tests, examples, benches, the web UI and the ggml backends other than CPU.
#
# Usage: tools/make_llama_tools_src.sh [OUT_DIR]     (default: .bench)
#   writes OUT_DIR/llama-tools-src.tar.gz, unpacking to llama_cpp_python-0.3.36/vendor/llama.cpp, the
#   layout tools/build_llama_tools.sh and tools/common.py (LLAMA_CPP) expect under ~/.cache/ggufq/llama-src:
#     mkdir -p ~/.cache/ggufq/llama-src && tar xzf OUT_DIR/llama-tools-src.tar.gz -C ~/.cache/ggufq/llama-src
#     tools/build_llama_tools.sh
# Source: $GGUFQ_LLAMA_SRC/llama_cpp_python-0.3.36 (default ~/.cache/ggufq/llama-src), unpacked from the
# sdist there when only the sdist is.
set -euo pipefail
VERSION=0.3.36
SRC_DIR="${GGUFQ_LLAMA_SRC:-$HOME/.cache/ggufq/llama-src}"
OUT="${1:-.bench}"
LIMIT=$((30 * 1024 * 1024))
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
TOP="llama_cpp_python-$VERSION"
if [ -d "$SRC_DIR/$TOP/vendor/llama.cpp" ]; then
  LC_SRC="$SRC_DIR/$TOP/vendor/llama.cpp"
elif [ -f "$SRC_DIR/$TOP.tar.gz" ]; then
  tar xzf "$SRC_DIR/$TOP.tar.gz" -C "$WORK" "$TOP/vendor/llama.cpp"
  mv "$WORK/$TOP" "$WORK/unpacked"
  LC_SRC="$WORK/unpacked/vendor/llama.cpp"
else
  echo "no llama.cpp source in $SRC_DIR (tools/build_llama_tools.sh downloads it there)" >&2
  exit 1
fi
LC="$WORK/out/$TOP/vendor/llama.cpp"
mkdir -p "$LC"
cp -a "$LC_SRC/." "$LC/"
rm -rf "$LC"/{models,docs,media,tests,examples,benches,pocs,ci,skills,.devops,.github,.git,build}
rm -rf "$LC/tools/ui"        # only entered with LLAMA_BUILD_SERVER, which build_llama_tools.sh turns off
find "$LC/tools/mtmd" -type f \( -name '*.mp4' -o -name '*.jpg' -o -name '*.png' -o -name '*.wav' -o -name '*.mp3' \) -delete
for b in vulkan opencl sycl metal hexagon cann et webgpu openvino virtgpu zdnn zendnn cuda hip musa; do
  rm -rf "$LC/ggml/src/ggml-$b"
done
[ -f "$LC/convert_hf_to_gguf.py" ] && [ -d "$LC/gguf-py" ] && [ -f "$LC/tools/quantize/CMakeLists.txt" ] || {
  echo "unexpected llama.cpp layout in $LC_SRC" >&2; exit 1; }
mkdir -p "$OUT"
OUTF="$OUT/llama-tools-src.tar.gz"
tar czf "$OUTF" -C "$WORK/out" "$TOP"
size=$(stat -c %s "$OUTF")
echo "$OUTF: $((size / 1024 / 1024)) MiB compressed ($(du -sm "$WORK/out" | cut -f1) MiB unpacked)"
if [ "$size" -ge "$LIMIT" ]; then
  echo "error: $OUTF is $size bytes, over the 30 MiB this is meant to stay under" >&2
  exit 1
fi
