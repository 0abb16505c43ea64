#!/usr/bin/env bash
# ggufq --method calibrated on the GPU machine vs on its CPU cores (vs llama-imatrix + llama-quantize
# when those tools are at hand), on the synthetic 1B model (tools/make_synthetic.py, Llama-3.2-1B
# shapes, random BF16 weights) with the default 32,768 self-generated calibration tokens.
#
# Steps (each timed: wall, CPU seconds of the process tree, peak RSS; one table at the end):
#   1. CUDA llama.cpp from the slim sdist, libraries and CLI tools in one CMake build, under
#      llama-cpp-python's Python bindings (tools/gpu_eval.sh -B -K; skipped when SITE already offloads,
#      e.g. a second call on a warm machine);
#   2. the synthetic 1B folder (~2.5 GB, seeded: the same bytes every time);
#   3. ggufq convert -t TYPE --method calibrated --gpu-layers -1 -j NPROC   (GPU forward)
#   4. ggufq convert -t TYPE --method calibrated --gpu-layers 0  -j NPROC   (CPU forward, -C to skip)
#   5. llama.cpp's calibrated path with the tools of step 1 (or LLAMA_BIN): F16 GGUF, llama-imatrix
#      -ngl 99 over the same number of tokens of TEXT, llama-quantize --imatrix.
# Every command runs under `timeout` so that the whole script ends inside BUDGET seconds (default
# 540: one device call is at most 600 s); a step cut by its timeout is reported as such, with its
# CPU seconds so far.
#
# Usage (repository root, on the device; carry .whl with the gguf + diskcache wheels and dist-slim/):
#   tools/gpu_calib.sh [-t TYPE] [-n TOKENS] [-b BUDGET] [-C] [-G] [-N] [-m "SYNTH ARGS"] [-s SDIST] [-w WHEELS] [TEXT]
#   -C  no CPU-forward run      -G  no GPU-forward run (each fits one 10-minute device call on its own)
#   -N  no build: whatever llama-cpp-python is importable (a CPU smoke test)
#   -m  make_synthetic.py size arguments (default "--size 1B"; a smoke test: "--size 0.25B --layers 1 --vocab 9000")
# TEXT: text for llama-imatrix (default: seeded pseudo-words written into WORK; the model is random anyway).
set -uo pipefail
TYPE=Q4_K_M
TOKENS=32768
BUDGET=540
CPU_RUN=1
GPU_RUN=1
NO_BUILD=0
SYN="--size 1B"
SDIST=dist-slim/llama_cpp_python-0.3.36.tar.gz
WHEELS=.whl
while getopts "t:n:b:CGNm:s:w:h" opt; do
  case $opt in
    t) TYPE=$OPTARG ;; n) TOKENS=$OPTARG ;; b) BUDGET=$OPTARG ;; C) CPU_RUN=0 ;; G) GPU_RUN=0 ;; N) NO_BUILD=1 ;; m) SYN=$OPTARG ;;
    s) SDIST=$OPTARG ;; w) WHEELS=$OPTARG ;;
    h|*) sed -n '2,26p' "$0"; exit 0 ;;
  esac
done
shift $((OPTIND - 1))
TEXT="${1:-}"
T0=$(date +%s)
LOGDIR="${OUT:-gpu-calib-logs}"
mkdir -p "$LOGDIR"
exec > >(tee -a "$LOGDIR/gpu_calib.log") 2>&1
PY=${PYTHON:-python3}
SITE="$PWD/.gpu-site"
WORK="${WORK:-$PWD/gpu-data/calib}"
NPROC=$(nproc)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
echo "== gpu_calib $(date -u +%FT%TZ) $(hostname), $NPROC cores, budget ${BUDGET} s"
command -v nvidia-smi >/dev/null && nvidia-smi -L

# 1. CUDA llama-cpp-python (reused from .gpu-site when it already offloads)
b0=$(date +%s)
if [ "$NO_BUILD" = 0 ]; then
  tools/gpu_eval.sh -B -K -s "$SDIST" -w "$WHEELS" -L "$LOGDIR" || { echo "gpu_calib: the CUDA build failed"; exit 1; }
  # the bindings load the CUDA libraries of that build; llama.cpp's own tools come from the same build
  export LLAMA_CPP_LIB_PATH="$SITE/llama-bin"
  LLAMA_BIN="${LLAMA_BIN:-$SITE/llama-bin}"
fi
BUILD_S=$(( $(date +%s) - b0 ))
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. the synthetic model (seeded, streaming)
mkdir -p "$WORK"
M="$WORK/synthetic-$(echo "$SYN" | tr -c 'A-Za-z0-9.' _)"
s0=$(date +%s)
[ -f "$M/config.json" ] || $PY tools/make_synthetic.py "$M" $SYN -q || { echo "gpu_calib: make_synthetic failed"; exit 1; }
SYN_S=$(( $(date +%s) - s0 ))
[ -n "$TEXT" ] || { TEXT="$WORK/text.txt"; [ -f "$TEXT" ] || $PY - "$TEXT" <<'EOF'
import sys, random
# llama-imatrix needs TOKENS tokens of some text: seeded pseudo-words (the synthetic model is random anyway)
r = random.Random(0)
words = ["".join(r.choice("etaoinshrdlucmfwyp") for _ in range(r.randint(2, 9))) for _ in range(5000)]
open(sys.argv[1], "w").write(" ".join(r.choice(words) for _ in range(200000)))
EOF
}

# timed LABEL SECONDS CMD...: runs under timeout, appends "label|status|wall|cpu|rss_mib" to $ROWS
ROWS="$LOGDIR/rows.txt"; : > "$ROWS"
timed() {
  local label=$1 secs=$2; shift 2
  if [ "$secs" -le 5 ]; then echo "$label|skipped: no time left|||" >> "$ROWS"; return 1; fi
  echo "== $label (timeout ${secs}s): $*"
  $PY - "$secs" "$LOGDIR/$(echo "$label" | tr -c 'A-Za-z0-9' _).time" "$@" <<'EOF'
import resource, subprocess, sys, time
secs, out, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
t0 = time.monotonic()
p = subprocess.Popen(cmd, start_new_session=True)
try:
    rc = p.wait(timeout=secs)
except subprocess.TimeoutExpired:
    import os, signal
    os.killpg(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    rc = 124
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(out, "w").write(f"{rc} {time.monotonic() - t0:.1f} {u.ru_utime + u.ru_stime:.1f} {u.ru_maxrss / 1024:.0f}\n")
sys.exit(rc)
EOF
  local rc=$?
  local wall cpu rss
  read -r _ wall cpu rss < "$LOGDIR/$(echo "$label" | tr -c 'A-Za-z0-9' _).time"
  local st=ok; [ $rc = 124 ] && st="timed out"; [ $rc != 0 ] && [ $rc != 124 ] && st="failed ($rc)"
  echo "$label|$st|$wall|$cpu|$rss" >> "$ROWS"
  return $rc
}

G="$WORK/ggufq-$TYPE"
rm -f "$G"-*.gguf
# 3 and 4: GPU forward first, then the CPU forward gets what is left (minus room for the llama.cpp rows)
if [ "$GPU_RUN" = 1 ]; then
  timed "ggufq calibrated, --gpu-layers -1, -j $NPROC" $(( $(left) - 30 )) \
    $PY -m ggufq convert "$M" -o "$G-gpu.gguf" -t "$TYPE" --method calibrated --calib-tokens "$TOKENS" \
    --gpu-layers -1 -j "$NPROC"
fi
if [ "$CPU_RUN" = 1 ]; then
  timed "ggufq calibrated, --gpu-layers 0, -j $NPROC" $(( $(left) - 20 )) \
    $PY -m ggufq convert "$M" -o "$G-cpu.gguf" -t "$TYPE" --method calibrated --calib-tokens "$TOKENS" \
    --gpu-layers 0 -j "$NPROC"
fi

# 5. llama.cpp's calibrated path, when its tools are here: on the GPU unless -G (then on the CPU cores)
NGL=99; [ "$GPU_RUN" = 0 ] && NGL=0
LB="${LLAMA_BIN:-}"
if [ -n "$LB" ] && [ -x "$LB/llama-imatrix" ] && [ -x "$LB/llama-quantize" ]; then
  F16="$WORK/f16.gguf"
  timed "F16 GGUF (ggufq convert)" $(( $(left) - 10 )) $PY -m ggufq convert "$M" -o "$F16" -t F16 -j "$NPROC" -q -f \
    && timed "llama-imatrix -ngl $NGL, $TOKENS tokens" $(( $(left) - 10 )) "$LB/llama-imatrix" -m "$F16" -f "$TEXT" \
         -o "$WORK/imatrix.gguf" -c 512 --chunks $(( TOKENS / 512 )) -t "$NPROC" -ngl "$NGL" --no-ppl \
    && timed "llama-quantize --imatrix" $(( $(left) - 5 )) "$LB/llama-quantize" --imatrix "$WORK/imatrix.gguf" \
         "$F16" "$WORK/llama-$TYPE.gguf" "$TYPE" "$NPROC"
  rm -f "$F16"
else
  echo "llama.cpp path|not run: no llama-imatrix/llama-quantize in LLAMA_BIN (the slim sdist builds the libraries only)|||" >> "$ROWS"
fi

echo
echo "synthetic model ($SYN), --type $TYPE, $TOKENS calibration tokens, $NPROC cores; CUDA build ${BUILD_S} s, model ${SYN_S} s"
echo "| step | status | wall s | CPU s | peak RSS MiB |"
echo "|---|---|---|---|---|"
while IFS='|' read -r l s w c r; do echo "| $l | $s | $w | $c | $r |"; done < "$ROWS"
grep -h "self-calibration:" "$LOGDIR/gpu_calib.log" | sed 's/^/  /' | head -4
rm -f "$G"-*.gguf
echo "total $(( $(date +%s) - T0 )) s"
