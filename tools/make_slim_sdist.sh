#!/usr/bin/env bash
# Make a slim llama-cpp-python sdist for building on a machine without internet (the GPU box):
# the pip-downloaded sdist minus what a library build never reads (vendored model vocab
# files, docs, media, tests, examples, benches, llama.cpp's CLI tools except mtmd, imatrix, quantize,
# perplexity and gguf-split, gguf-py
# and conversion scripts, ggml backends other than CPU/CUDA/BLAS/RPC, the git history). The result builds the same shared libraries (libllama, libggml*,
# libmtmd) and must stay under 60 MiB.
#
# Usage: tools/make_slim_sdist.sh [SDIST] [OUT_DIR]
#   SDIST    default: the sdist in ~/.cache/ggufq/llama-src (tools/build_llama_tools.sh downloads it there:
#            python -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36)
#   OUT_DIR  default: dist-slim/ ; writes OUT_DIR/llama_cpp_python-<ver>.tar.gz
# Check only (no build): cmake configures the slim tree with -DLLAVA_BUILD=OFF when cmake exists.
set -euo pipefail
SDIST="${1:-${GGUFQ_LLAMA_SRC:-$HOME/.cache/ggufq/llama-src}/llama_cpp_python-0.3.36.tar.gz}"
OUT="${2:-dist-slim}"
LIMIT=$((60 * 1024 * 1024))

[ -f "$SDIST" ] || { echo "sdist not found: $SDIST" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK"
TOP="$(ls "$WORK")"
[ "$(echo "$TOP" | wc -l)" = 1 ] || { echo "unexpected sdist layout: $TOP" >&2; exit 1; }
ROOT="$WORK/$TOP"
LC="$ROOT/vendor/llama.cpp"
[ -f "$LC/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }

before=$(du -sb "$ROOT" | cut -f1)
# llama.cpp: keep CMake, ggml, src, include, common, vendor, cmake, licenses and tools/mtmd
rm -rf "$LC"/{models,docs,media,tests,examples,benches,pocs,gguf-py,conversion,scripts,grammars,ci,skills,requirements,.devops,.github}
# tools: mtmd (llama-cpp-python builds it) and the four CLI tools the GPU benchmarks run beside ggufq
# (tools/gpu_eval.sh -K builds them with CUDA in the same CMake build as the libraries)
KEEP_TOOLS="mtmd imatrix quantize perplexity gguf-split"
find "$LC/tools" -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt $(printf '! -name %s ' $KEEP_TOOLS) -exec rm -rf {} +
cat > "$LC/tools/CMakeLists.txt" <<EOF
# slim sdist (ggufq tools/make_slim_sdist.sh): only the tools kept in this tree
find_package(Threads REQUIRED)
llama_add_compile_flags()
foreach(t $KEEP_TOOLS)
    add_subdirectory(\${t})
endforeach()
EOF
rm -f "$LC"/convert_*.py "$LC"/build-xcframework.sh "$LC"/flake.nix
find "$LC/tools/mtmd" -type f \( -name '*.mp4' -o -name '*.jpg' -o -name '*.png' -o -name '*.wav' -o -name '*.mp3' \) -delete
# ggml backends CMake only enters when their GGML_<NAME> option is on; CPU, CUDA (with HIP and
# MUSA, which reuse its sources), BLAS and RPC stay
for b in vulkan opencl sycl metal hexagon cann et webgpu openvino virtgpu zdnn zendnn; do
  rm -rf "$LC/ggml/src/ggml-$b"
done
# git history of the submodule (38 MB); build-info then reads "unknown" for the commit
rm -rf "$ROOT/.git"
# llama-cpp-python: docs and examples
rm -rf "$ROOT"/{docs,examples,docker,tests}
after=$(du -sb "$ROOT" | cut -f1)

mkdir -p "$OUT"
OUTF="$OUT/$TOP.tar.gz"
tar czf "$OUTF" -C "$WORK" "$TOP"
size=$(stat -c %s "$OUTF")
echo "slim sdist: $OUTF: $((size / 1024 / 1024)) MiB compressed ($((before / 1024 / 1024)) -> $((after / 1024 / 1024)) MiB unpacked)"
if [ "$size" -ge "$LIMIT" ]; then
  echo "error: slim sdist is $size bytes, over the 60 MiB limit" >&2
  exit 1
fi
if command -v cmake >/dev/null; then
  if cmake -S "$ROOT" -B "$WORK/cfg" -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF >"$WORK/cfg.log" 2>&1; then
    echo "cmake configures the slim tree (LLAVA_BUILD=OFF): ok"
  else
    tail -20 "$WORK/cfg.log" >&2
    echo "error: cmake cannot configure the slim tree" >&2
    exit 1
  fi
fi
