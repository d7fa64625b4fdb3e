#!/usr/bin/env bash
# Multi-turn chat (`tandem bench serve --dataset-name multi-turn`) against one `tandem serve` of the
# ~88M random Llama (bench-88m, dummy weights) whose device KV cache holds about two conversations,
# without and then with the host KV tier (--kv-offloading-size 1). 8 conversations x 4 turns,
# round-robin at 0.3 requests/s (below this CPU's prefill capacity, so TTFT is not queueing): by the
# time a conversation returns, 7 others have evicted its prefix from the device cache.
# Results: benchmarks/results/serve-multiturn-{off,on}-<UTC time>.json (TTFT p50/p99 per turn in "groups").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8123}
DIR=$($PY -c "from tandem.testing import write_dummy_model; print(write_dummy_model('bench-88m', '.cache/dummy/bench-88m'))")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
run() {
  local name=$1; shift
  $PY -m tandem.cli serve "$DIR" --load-format dummy --port "$PORT" --block-size 16 \
    --num-gpu-blocks-override 160 "$@" > "/tmp/serve-multiturn-$name.log" 2>&1 &
  local pid=$!
  trap 'kill -INT $pid 2>/dev/null || true' EXIT
  for _ in $(seq 180); do
    $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null && break
    sleep 1
  done
  $PY -m tandem.cli bench serve --port "$PORT" --tokenizer "$DIR" --dataset-name multi-turn \
    --multi-turn-conversations 8 --multi-turn-turns 4 --multi-turn-context-len 512 --multi-turn-user-len 64 \
    --multi-turn-reply-len 64 --multi-turn-output-len 32 --request-rate ${RATE:-0.3} --ignore-eos --disable-tqdm \
    --save-result --result-filename "serve-multiturn-$name-$STAMP.json" --label "multi-turn, offloading $name"
  kill -INT "$pid" 2>/dev/null || true; wait "$pid" || true
  trap - EXIT
}
run off
run on --kv-offloading-size 1
