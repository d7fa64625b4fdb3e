#!/usr/bin/env bash
# Online serving side by side on this CPU: vLLM's own client, `vllm bench serve`, against
# `tandem serve` and against `vllm serve` (the CPU peer), same model, same prompts (same seed),
# same arrival schedule, fp32, ignore_eos. Servers run one at a time; runs are interleaved.
#   usage: scripts/bench_serve_side_by_side.sh MODEL_DIR [VLLM_VENV]
# Environment: RATE (req/s, default 1), NUM_PROMPTS (48), IN_LEN (256), OUT_LEN (128), REPS (2),
#              VLLM_OMP (OMP_NUM_THREADS for vllm serve; empty = vLLM's default),
#              SERVERS ("tandem vllm"), TANDEM_ARGS (extra `tandem serve` flags).
# Writes benchmarks/results/serve-cpu-side-by-side-<UTC>.json (medians of every run) and keeps
# each run's `vllm bench serve` JSON under benchmarks/results/raw/.
set -euo pipefail
MODEL=${1:?model dir}
VLLM_VENV=${2:-/tmp/peer-vllm-cpu}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-benchmarks/results/raw}
SERVERS=${SERVERS:-tandem vllm}; TANDEM_ARGS=${TANDEM_ARGS:-}
RATE=${RATE:-1}; NUM_PROMPTS=${NUM_PROMPTS:-48}; IN_LEN=${IN_LEN:-256}; OUT_LEN=${OUT_LEN:-128}; REPS=${REPS:-2}
PORT=${PORT:-18101}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || "$PY" -m tandem.testing "$MODEL" --bench
export HF_HUB_OFFLINE=1

wait_ready() {  # $1 pid
  for _ in $(seq 600); do
    kill -0 "$1" 2>/dev/null || { echo "server exited" >&2; return 1; }
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    sleep 1
  done
  return 1
}

stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

client() {  # $1 run name
  "$VLLM_VENV/bin/vllm" bench serve --backend vllm --base-url "http://127.0.0.1:$PORT" --model bench \
    --tokenizer "$MODEL" --dataset-name random --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN" \
    --random-range-ratio 0.5 --num-prompts "$NUM_PROMPTS" --request-rate "$RATE" --seed 0 --ignore-eos \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --result-dir "$WORK" --result-filename "serve-$1-$STAMP.json" 2>&1 \
    | grep -E "Median (TTFT|TPOT)|Output token throughput|Successful requests"
}

run_tandem() {
  .venv/bin/tandem serve "$MODEL" --port "$PORT" --served-model-name bench --dtype float32 \
    --kv-cache-memory 2GiB --max-model-len 2048 $TANDEM_ARGS >"$WORK/tandem-serve-$STAMP.log" 2>&1 &
  local pid=$!
  wait_ready $pid && client "tandem-$1"
  stop $pid
}

run_vllm() {
  env ${VLLM_OMP:+OMP_NUM_THREADS=$VLLM_OMP} VLLM_CPU_KVCACHE_SPACE=2 "$VLLM_VENV/bin/vllm" serve "$MODEL" \
    --port "$PORT" --served-model-name bench --dtype float32 --max-model-len 2048 --disable-log-stats \
    >"$WORK/vllm-serve-$STAMP.log" 2>&1 &
  local pid=$!
  wait_ready $pid && client "vllm-$1"
  stop $pid
}

for i in $(seq "$REPS"); do
  for server in $SERVERS; do echo "== $server $i"; "run_$server" "$i"; done
done
"$PY" scripts/merge_serve_side_by_side.py "$WORK" "$STAMP" "benchmarks/results/serve-cpu-side-by-side-$STAMP.json" \
  --model "$MODEL" --vllm-omp "${VLLM_OMP:-default}" --tandem-args "$TANDEM_ARGS"
