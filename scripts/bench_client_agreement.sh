#!/usr/bin/env bash
# Do `tandem bench serve` and vLLM's `vllm bench serve` measure the same thing? Against one running
# server, the two clients take turns sending the same workload (same random prompts, same seed,
# same Poisson schedule); repeated for `tandem serve` and for `vllm serve` (the CPU peer). Prefix
# caching is off on both servers: otherwise each run after the first hits the previous run's prompts.
#   usage: scripts/bench_client_agreement.sh MODEL_DIR [VLLM_VENV]
# Environment: RATE (1), NUM_PROMPTS (32), IN_LEN (256), OUT_LEN (96), REPS (2), SERVERS ("tandem vllm").
# Writes benchmarks/results/client-agreement-<UTC>.json.
set -euo pipefail
MODEL=${1:?model dir}
VLLM_VENV=${2:-/tmp/peer-vllm-cpu}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-benchmarks/results/raw}
RATE=${RATE:-1}; NUM_PROMPTS=${NUM_PROMPTS:-32}; IN_LEN=${IN_LEN:-256}; OUT_LEN=${OUT_LEN:-96}; REPS=${REPS:-2}
SERVERS=${SERVERS:-tandem vllm}
PORT=${PORT:-18102}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || "$PY" -m tandem.testing "$MODEL" --bench
export HF_HUB_OFFLINE=1
COMMON=(--base-url "http://127.0.0.1:$PORT" --model bench --tokenizer "$MODEL" --dataset-name random
        --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN" --random-range-ratio 0.5
        --num-prompts "$NUM_PROMPTS" --request-rate "$RATE" --seed 0 --ignore-eos
        --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --save-result --result-dir "$WORK")

wait_ready() {
  for _ in $(seq 600); do
    kill -0 "$1" 2>/dev/null || { echo "server exited" >&2; return 1; }
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    sleep 1
  done
  return 1
}

start_server() {  # $1 tandem|vllm
  if [ "$1" = tandem ]; then
    .venv/bin/tandem serve "$MODEL" --port "$PORT" --served-model-name bench --dtype float32 \
      --kv-cache-memory 2GiB --max-model-len 2048 --no-enable-prefix-caching >"$WORK/agree-tandem-$STAMP.log" 2>&1 &
  else
    VLLM_CPU_KVCACHE_SPACE=2 "$VLLM_VENV/bin/vllm" serve "$MODEL" --port "$PORT" --served-model-name bench \
      --dtype float32 --max-model-len 2048 --no-enable-prefix-caching --disable-log-stats >"$WORK/agree-vllm-$STAMP.log" 2>&1 &
  fi
  SERVER_PID=$!
  wait_ready $SERVER_PID
}

for server in $SERVERS; do
  start_server "$server"
  .venv/bin/tandem bench serve --backend openai --disable-tqdm "${COMMON[@]}" --num-prompts 4 \
    --request-rate inf --result-dir "$WORK/warmup" >/dev/null  # warm-up, not recorded
  for i in $(seq "$REPS"); do
    echo "== $server server, vllm client $i"
    "$VLLM_VENV/bin/vllm" bench serve --backend vllm "${COMMON[@]}" \
      --result-filename "agree-$server-vllmclient-$i-$STAMP.json" 2>&1 | grep -E "Median (TTFT|TPOT)" || true
    echo "== $server server, tandem client $i"
    .venv/bin/tandem bench serve --backend openai --disable-tqdm "${COMMON[@]}" \
      --result-filename "agree-$server-tandemclient-$i-$STAMP.json" | grep -E "median_(ttft|tpot)_ms" || true
  done
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
done
"$PY" scripts/merge_client_agreement.py "$WORK" "$STAMP" "benchmarks/results/client-agreement-$STAMP.json" \
  --model "$MODEL"
