#!/usr/bin/env bash
# Offline throughput side by side on this CPU: tandem, vLLM's CPU build, transformers' generate,
# same model directory, same vLLM random dataset (same seed, so the same prompts), fp32 (DTYPE), ignore_eos.
#   usage: [REPS=3] [OMP2=1] [DTYPE=float32|bfloat16] [TORCHATTN=0] scripts/bench_cpu_side_by_side.sh MODEL_DIR [VLLM_VENV]
# Interleaved repetitions of: tandem (defaults), tandem with the torch attention backend (the C++
# CPU kernels off), vLLM with its default threads (and OMP_NUM_THREADS=2 with OMP2=1).
# Builds the ~88M bench model with `python -m tandem.testing MODEL_DIR --bench` if it is missing.
# Writes benchmarks/results/throughput-cpu-side-by-side-<UTC>.json (all runs) next to each run's JSON.
set -euo pipefail
MODEL=${1:?model dir}
VLLM_VENV=${2:-/tmp/peer-vllm-cpu}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-benchmarks/results/raw}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DTYPE=${DTYPE:-float32}
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || "$PY" -m tandem.testing "$MODEL" --bench
W=(--num-prompts 64 --seed 0 --random-range-ratio 0.75)
run_tandem() { .venv/bin/tandem bench throughput --model "$MODEL" "${W[@]}" --input-len 288 --output-len 144 \
  --dtype "$DTYPE" --kv-cache-memory 2GiB --disable-tqdm --output-json "$WORK/tandem-$STAMP-$1.json" "${@:2}" \
  | grep -E "Throughput"; }
run_vllm() { HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 "$VLLM_VENV/bin/vllm" bench throughput --model "$MODEL" \
  --dataset-name random "${W[@]}" --random-input-len 288 --random-output-len 144 --dtype "$DTYPE" \
  --max-model-len 2048 --disable-log-stats --output-json "$WORK/vllm-$STAMP-$1.json" 2>&1 | grep -E "Throughput|Total num"; }
for i in $(seq "${REPS:-3}"); do
  run_tandem "$i"
  if [ "${TORCHATTN:-1}" != 0 ]; then run_tandem "torchattn-$i" --attention-backend torch; fi
  run_vllm "default-$i"
  if [ -n "${OMP2:-}" ]; then OMP_NUM_THREADS=2 run_vllm "omp2-$i"; fi
done
"$PY" scripts/bench_transformers.py --model "$MODEL" "${W[@]}" --input-len 288 --output-len 144 --batch-size 16 --dtype "$DTYPE" \
  --output-json "$WORK/transformers-$STAMP.json"
"$PY" scripts/merge_side_by_side.py "$WORK" "$STAMP" "benchmarks/results/throughput-cpu-side-by-side-$([ "$DTYPE" = float32 ] || echo "$DTYPE-")$STAMP.json"
