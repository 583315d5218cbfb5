#!/usr/bin/env bash
# ggufllm serve against llama-server (the peer), same model, same slots, same client, one run.
#
#   bash benchmarks/llama_server_peer.sh [--requests 16] [--max-tokens 64] [--concurrency 1,4,8]
#
# llama-server is the one /work/shared/tools/build_llama_server.sh builds from the llama.cpp that
# llama-cpp-python 0.3.36 vendors ($GGUFLLM_SCRATCH/llama-server-build/bin/llama-server, or
# $LLAMA_SERVER). Without it, only ggufllm is measured. Both servers get 2 threads, 8 slots
# (--parallel = the highest concurrency) and a context of 1024 tokens per slot; the client is
# `ggufllm bench` (greedy streamed /v1/completions), run against each server in turn.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=16; MAX_TOKENS=64; LEVELS=1,4,8; THREADS=${N_THREADS:-2}
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) REQUESTS=$2; shift 2;;
    --max-tokens) MAX_TOKENS=$2; shift 2;;
    --concurrency) LEVELS=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
SLOTS=$(echo "$LEVELS" | tr ',' '\n' | sort -n | tail -1)
MODEL=$(python -c 'from ggufllm.resolve import default_model_path; print(default_model_path())')
S=${GGUFLLM_SCRATCH:-$HOME/.cache/ggufllm-scratch}
PEER=${LLAMA_SERVER:-$S/llama-server-build/bin/llama-server}
PORT_PEER=18601; PORT_OURS=18602
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
bench() { python -m ggufllm.cli bench --url "http://127.0.0.1:$1" --concurrency "$LEVELS" \
            --requests "$REQUESTS" --max-tokens "$MAX_TOKENS"; }

echo "model $MODEL, $THREADS threads, $SLOTS slots, $REQUESTS requests x $MAX_TOKENS tokens"
if [ -x "$PEER" ]; then
  "$PEER" -m "$MODEL" --host 127.0.0.1 --port $PORT_PEER -t "$THREADS" -np "$SLOTS" \
    -c $((1024 * SLOTS)) --log-disable >/dev/null 2>&1 &
  PIDS+=($!)
  echo "== llama-server ($PEER)"
  bench $PORT_PEER
  kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
else
  echo "== llama-server: not built (bash /work/shared/tools/build_llama_server.sh); skipped"
fi
N_THREADS=$THREADS MAX_LENGTH=1024 python -m ggufllm.cli serve --model "$MODEL" --port $PORT_OURS \
  --parallel "$SLOTS" 2>/dev/null &
PIDS+=($!)
echo "== ggufllm serve"
bench $PORT_OURS
