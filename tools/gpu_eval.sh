#!/usr/bin/env bash
# ggufq eval on an NVIDIA GPU machine: builds llama-cpp-python with CUDA from a slim sdist
# (tools/make_slim_sdist.sh) and evaluates every GGUF of a folder with all layers offloaded
# (--gpu-layers -1) and on the CPU (--gpu-layers 0), then prints PPL of both, their relative
# difference (must be < 0.05 %) and tokens/s. With an F16 file in the folder, the others are
# also evaluated against it on the GPU (KLD, same-top %).
#
# Usage (from the repository root):
#   tools/gpu_eval.sh [options] GGUF_DIR TEXT
# Options:
#   -s SDIST     slim sdist (default: dist-slim/llama_cpp_python-0.3.36.tar.gz)
#   -w WHEELS    folder of wheels to install first with --no-index (e.g. diskcache; default: .whl if there)
#   -S SITE      where llama-cpp-python and the wheels are installed (default: .gpu-site; reused when
#                its llama_cpp already offloads, so a second call on a warm machine skips the build)
#   -c CTX       context (default 512)     -n CHUNKS   chunks, 0 = all (default 40)
#   -t THREADS   CPU threads for --gpu-layers 0 (default: all cores)
#   -a ARCH      CUDA architectures (default 90)
#   -B           build only, no evaluation
#   -K           one CMake build of the sdist's llama.cpp with CUDA: the shared libraries (llama-cpp-python's
#                Python package, copied from the sdist, loads them through LLAMA_CPP_LIB_PATH, as ggufq does)
#                and llama.cpp's llama-imatrix, llama-quantize, llama-perplexity and llama-gguf-split, all in
#                SITE/llama-bin -- CUDA compiles once for both. Callers export
#                LLAMA_CPP_LIB_PATH=SITE/llama-bin and LLAMA_BIN=SITE/llama-bin
#   -N           no build: use whatever llama-cpp-python is importable (to try the script on a CPU box;
#                the GPU rows then fail their check)
#   -m MODEL_DIR convert this Hugging Face folder with ggufq into GGUF_DIR first (types -T, default
#                "F16 Q8_0"; needs the gguf wheel), e.g. -m fixtures/tinyllama-spm-10m, when carrying
#                GGUFs would exceed the transfer limit
#   -L LOGDIR    log and JSON folder (default: $OUT if set, else gpu-eval-logs)
# Everything printed also goes to LOGDIR/gpu_eval.log.
set -uo pipefail

SDIST=dist-slim/llama_cpp_python-0.3.36.tar.gz
WHEELS=""
SITE="$PWD/.gpu-site"
CTX=512
CHUNKS=40
THREADS=""
ARCH=90
BUILD_ONLY=0
NO_BUILD=0
TOOLS_BUILD=0
MODEL_DIR=""
TYPES="F16 Q8_0"
LOGDIR="${OUT:-gpu-eval-logs}"
while getopts "s:w:S:c:n:t:a:BKNm:T:L:h" opt; do
  case $opt in
    s) SDIST=$OPTARG ;; w) WHEELS=$OPTARG ;; S) SITE=$(realpath -m "$OPTARG") ;;
    c) CTX=$OPTARG ;; n) CHUNKS=$OPTARG ;; t) THREADS=$OPTARG ;; a) ARCH=$OPTARG ;;
    B) BUILD_ONLY=1 ;; K) TOOLS_BUILD=1 ;; N) NO_BUILD=1 ;; m) MODEL_DIR=$OPTARG ;; T) TYPES=$OPTARG ;; L) LOGDIR=$OPTARG ;;
    h) sed -n '2,30p' "$0"; exit 0 ;;
    *) sed -n '2,30p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ "$BUILD_ONLY" = 0 ] && [ $# -ne 2 ]; then sed -n '2,30p' "$0" >&2; exit 2; fi
GGUF_DIR="${1:-}"
TEXT="${2:-}"
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_eval.log"
exec > >(tee -a "$LOG") 2>&1
die() { echo "gpu_eval: error: $*"; exit 1; }

PY=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
[ -n "$WHEELS" ] || { [ -d .whl ] && WHEELS=.whl; }
echo "== gpu_eval $(date -u +%FT%TZ) on $(hostname)"
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY --version

mkdir -p "$SITE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "== installing wheels from $WHEELS into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || die "installing the wheels failed"
fi

offloads() { $PY -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; }
if [ "$TOOLS_BUILD" = 1 ]; then export LLAMA_CPP_LIB_PATH="$SITE/llama-bin" LLAMA_BIN="$SITE/llama-bin"; fi
if [ "$NO_BUILD" = 1 ]; then
  echo "== no build (-N): llama-cpp-python $($PY -c 'import llama_cpp; print(llama_cpp.__version__)' 2>&1), offload: $(offloads && echo yes || echo no)"
elif offloads; then
  echo "== llama-cpp-python with GPU offload already in $SITE: $($PY -c 'import llama_cpp; print(llama_cpp.__version__)')"
else
  [ -f "$SDIST" ] || die "slim sdist not found: $SDIST (make it with tools/make_slim_sdist.sh and carry it)"
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  command -v nvcc >/dev/null || die "nvcc not found"
  t0=$(date +%s)
  if [ "$TOOLS_BUILD" = 1 ]; then
    echo "== building llama.cpp (libraries + CLI tools) with CUDA (arch $ARCH) from $SDIST; nvcc: $(nvcc --version | tail -1)"
    SRC="$SITE/src"
    rm -rf "$SRC" && mkdir -p "$SRC" && tar xzf "$SDIST" -C "$SRC" || die "cannot unpack $SDIST"
    TOP="$SRC/$(ls "$SRC")"
    { cmake -S "$TOP/vendor/llama.cpp" -B "$SITE/llama-build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
      && cmake --build "$SITE/llama-build" -j"$(nproc)" \
           --target llama llama-imatrix llama-quantize llama-perplexity llama-gguf-split; } \
      > "$LOGDIR/build.log" 2>&1 || { tail -40 "$LOGDIR/build.log"; die "building llama.cpp failed (see $LOGDIR/build.log)"; }
    rm -rf "$SITE/llama-bin" "$SITE/llama_cpp" && mkdir -p "$SITE/llama-bin"
    cp -a "$SITE/llama-build/bin/." "$SITE/llama-bin/"
    cp -a "$TOP/llama_cpp" "$SITE/llama_cpp"          # the bindings: pure Python, libraries from LLAMA_CPP_LIB_PATH
    echo "== built in $(( $(date +%s) - t0 )) s: $(ls "$SITE/llama-bin" | tr '\n' ' ')"
    offloads || die "the built llama.cpp does not report GPU offload"
  else
  echo "== building llama-cpp-python with CUDA (arch $ARCH) from $SDIST; nvcc: $(nvcc --version | tail -1)"
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir --upgrade --target "$SITE" "$SDIST" \
    > "$LOGDIR/build.log" 2>&1 || { tail -40 "$LOGDIR/build.log"; die "building llama-cpp-python failed (see $LOGDIR/build.log)"; }
  echo "== built in $(( $(date +%s) - t0 )) s"
  offloads || die "the built llama-cpp-python does not report GPU offload"
  fi
fi
$PY -c "import diskcache" 2>/dev/null || echo "note: diskcache missing (llama_cpp.Llama needs it; ggufq eval does not)"
[ "$BUILD_ONLY" = 1 ] && exit 0

if [ -n "$MODEL_DIR" ]; then
  mkdir -p "$GGUF_DIR"
  name=$(basename "$MODEL_DIR")
  for t in $TYPES; do
    out="$GGUF_DIR/$name-$t.gguf"
    [ -f "$out" ] && continue
    echo "== ggufq convert $MODEL_DIR -t $t"
    $PY -m ggufq convert "$MODEL_DIR" -o "$out" -t "$t" -q || die "ggufq convert -t $t failed"
  done
fi
[ -d "$GGUF_DIR" ] || die "GGUF folder not found: $GGUF_DIR"
[ -f "$TEXT" ] || die "text not found: $TEXT"
mapfile -t FILES < <(ls "$GGUF_DIR"/*.gguf 2>/dev/null | sort)
[ ${#FILES[@]} -gt 0 ] || die "no .gguf in $GGUF_DIR"
REF=""
for f in "${FILES[@]}"; do case "$(basename "$f")" in *[Ff]16*) REF=$f; break ;; esac; done

fail=0
for f in "${FILES[@]}"; do
  b=$(basename "$f" .gguf)
  for mode in gpu cpu; do
    ngl=-1; [ $mode = cpu ] && ngl=0
    echo "== $b --gpu-layers $ngl"
    $PY -m ggufq eval "$f" --text "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" --gpu-layers $ngl -t "$THREADS" -q \
      --json "$LOGDIR/$b-$mode.json" || { echo "ggufq eval failed for $b ($mode)"; fail=1; }
  done
  if [ -n "$REF" ] && [ "$f" != "$REF" ]; then
    echo "== $b --ref $(basename "$REF") --gpu-layers -1"
    $PY -m ggufq eval "$f" --ref "$REF" --text "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" --gpu-layers -1 -q \
      --json "$LOGDIR/$b-kld.json" || { echo "ggufq eval --ref failed for $b"; fail=1; }
  fi
done

echo "== summary (ctx $CTX, chunks $CHUNKS, CPU threads $THREADS)"
$PY - "$LOGDIR" "${FILES[@]}" <<'EOF' || fail=1
import json, os, sys
d, files = sys.argv[1], sys.argv[2:]
rows, bad = [], 0
print("| file | device (GPU run) | PPL GPU | PPL CPU | rel. diff | tok/s GPU | tok/s CPU | speed-up | KLD vs F16 (GPU) | same top |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in files:
    b = os.path.basename(f)[:-5]
    try:
        g = json.load(open(os.path.join(d, f"{b}-gpu.json")))
        c = json.load(open(os.path.join(d, f"{b}-cpu.json")))
    except OSError:
        print(f"| {b} | missing results |"); bad += 1; continue
    rel = abs(g["ppl"] - c["ppl"]) / c["ppl"]
    ok = rel < 5e-4 and g["gpu_layers"] > 0
    bad += not ok
    k = ""
    kp = os.path.join(d, f"{b}-kld.json")
    if os.path.exists(kp):
        kk = json.load(open(kp))["kld"]
        k = f"{kk['kld_mean']:.6f} | {100 * kk['same_top']:.2f} %"
    else:
        k = " | "
    print(f"| {b} | {g['device']} | {g['ppl']:.4f} | {c['ppl']:.4f} | {100 * rel:.4f} %{'' if ok else ' FAIL'} | "
          f"{g['tokens_per_s']:.0f} | {c['tokens_per_s']:.0f} | {g['tokens_per_s'] / c['tokens_per_s']:.1f}x | {k} |")
print("PPL on GPU and CPU agree within 0.05 % for every file" if not bad else f"{bad} file(s) FAILED")
sys.exit(1 if bad else 0)
EOF
exit $fail
