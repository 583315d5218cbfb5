#!/usr/bin/env bash
# GPU check that fits a short lease (< 10 min on an H100, build included), or its CPU mode.
#
#   benchmarks/make_gpu_bundle.sh            # here, with network: trimmed sdist + wheels (< 20 MB)
#   benchmarks/gpu_check.sh [--arch 90]      # on the CUDA machine (no network needed)
#   benchmarks/gpu_check.sh --cpu            # anywhere: small synthetic model, no CUDA build
#
# GPU mode: installs the carried wheels, builds llama-cpp-python's CUDA backend for one
# architecture from the trimmed sdist (ggufllm's own build code: preset cuda-smARCH) while a
# full-size synthetic gpt-oss-20b GGUF (~12 GB, real shapes and types, random values) is
# written through the converter's writer, then measures load, prefill (512 tokens) and
# decode tok/s fully offloaded and with all experts on the CPU, through the bare llama.cpp
# API and through ggufllm, with GPU memory against estimate_memory; then concurrency at
# 1/4/8 requests if benchmarks/concurrency.py exists. Results: WORKDIR/results.json
# (and $OUT/gpu_check.json when $OUT is set).
set -euo pipefail
MODE=gpu ARCH=90 BUNDLE=.gpu_bundle WORK="${TMPDIR:-/tmp}/ggufllm-gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --arch) ARCH="$2"; shift ;;
    --bundle) BUNDLE="$2"; shift ;;
    --workdir) WORK="$2"; shift ;;
    *) echo "usage: $0 [--cpu] [--arch 80|86|89|90] [--bundle DIR] [--workdir DIR]" >&2; exit 2 ;;
  esac
  shift
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }

if [ "$MODE" = gpu ]; then
  SDIST=$(ls "$BUNDLE"/llama_cpp_python-*-trimmed.tar.gz 2>/dev/null | head -1)
  [ -n "$SDIST" ] || { echo "no trimmed sdist in $BUNDLE: run benchmarks/make_gpu_bundle.sh first" >&2; exit 1; }
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  if ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
    stamp "installing carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile "$BUNDLE"/wheels/*.whl
  fi
  MODEL="$WORK/gpt-oss-20b-synthetic.gguf"
  stamp "writing the full-size synthetic GGUF in the background"
  "$PY" benchmarks/gpu_check.py write --size full --out "$MODEL" >"$WORK/write.log" 2>&1 &
  WRITER=$!
  stamp "building llama-cpp-python (preset cuda-sm$ARCH) from $SDIST"
  "$PY" benchmarks/gpu_check.py build --preset "cuda-sm$ARCH" --source "$SDIST" --log "$WORK/build.log"
  wait "$WRITER" || { cat "$WORK/write.log"; exit 1; }
  tail -2 "$WORK/write.log"
  BENCH_ARGS=(--gpu)
else
  MODEL="$WORK/gpt-oss-small-synthetic.gguf"
  stamp "writing a small synthetic gpt-oss GGUF"
  "$PY" benchmarks/gpu_check.py write --size small --out "$MODEL"
  BENCH_ARGS=(--decode 16)
fi
# the concurrency run: 1/4/8 requests of 64 tokens on the GPU; 1/2 of 4 tokens in the CPU
# mode, which checks that the script runs, not the figures
CONC_ARGS=$([ "$MODE" = gpu ] && echo "--levels 1,4,8 --tokens 64" || echo "--levels 1,2 --tokens 4")

stamp "measuring"
"$PY" benchmarks/gpu_check.py bench --model "$MODEL" "${BENCH_ARGS[@]}" --json "$WORK/results.json"
if [ -n "${OUT:-}" ]; then cp "$WORK/results.json" "$OUT/gpu_check.json"; fi

if [ -f benchmarks/concurrency.py ]; then
  stamp "concurrency (benchmarks/concurrency.py $CONC_ARGS)"
  N_GPU_LAYERS=$([ "$MODE" = gpu ] && echo -1 || echo 0) \
    "$PY" benchmarks/concurrency.py --model "$MODEL" $CONC_ARGS \
    || echo "concurrency: benchmarks/concurrency.py failed (see above)"
else
  echo "concurrency: skipped (benchmarks/concurrency.py does not exist yet)"
fi
stamp "done"
