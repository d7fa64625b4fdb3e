#!/usr/bin/env bash
# Interference benchmark for disaggregated serving, equal resources (this machine's cores split
# evenly between workers by `tandem up`): chat streams plus a long document every few seconds, on
#   pd       tandem up --prefill 1 --decode 1   (router's cost-based P/D decider)
#   replicas tandem up --replicas 2             (cache-aware router, colocated prefill + decode)
#   single   tandem serve                       (one replica, chunked prefill, all cores)
# Usage: scripts/bench_disagg.sh MODEL_DIR [OUT_DIR]; then scripts/merge_disagg.py OUT_DIR.
set -euo pipefail
MODEL=${1:?model dir}
OUT=${2:-benchmarks/results/raw/disagg-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
PORT=8520
WORKER="--max-num-seqs 16 --max-num-batched-tokens 512 --kv-cache-memory 1GiB"
BENCH=(--base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" --dataset-name interference
       --num-prompts ${CHATS:-24} --request-rate ${RATE:-0.75} --seed 0 --ignore-eos
       --interference-chat-input-len 128 --interference-chat-output-len 128
       --interference-long-input-len 1000 --interference-long-output-len 16 --interference-long-interval 4
       --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99
       --goodput ttft:${SLO_TTFT:-2000} tpot:${SLO_TPOT:-150} --save-result --result-dir "$OUT" --disable-tqdm)

wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 1; done; return 1; }
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; sleep 2; }

run() {  # name, command...
  local name=$1; shift
  setsid "$@" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  wait_up
  python -m tandem.cli bench serve "${BENCH[@]}" --label "$name" --result-filename "$name.json"
  curl -s "http://127.0.0.1:$PORT/metrics" >"$OUT/$name.router-metrics.txt" || true
  { grep -oE 'http://127.0.0.1:[0-9]+ (prefill|decode|both)' "$OUT/$name.log" || true; } | while read -r url role; do
    curl -s "$url/metrics" >"$OUT/$name.$role.$(echo "$url" | tr -dc 0-9).metrics.txt" || true
  done
  kill -TERM -- "-$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || break; sleep 1; done
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then echo "port $PORT still served after stop" >&2; exit 1; fi
  sleep 2
}

if [ -n "${PD_ONLY:-}" ]; then  # e.g. PD_ONLY="--pd-interference-weight 4": just that P/D fleet, as pd-extra
  run pd-extra tandem up "$MODEL" --prefill 1 --decode 1 --port $PORT --worker-args "$WORKER" $PD_ONLY
  echo "$OUT"; exit 0
fi
run pd tandem up "$MODEL" --prefill 1 --decode 1 --port $PORT --worker-args "$WORKER"
run replicas tandem up "$MODEL" --replicas 2 --port $PORT --worker-args "$WORKER"
run single tandem serve "$MODEL" --port $PORT $WORKER
echo "$OUT"
