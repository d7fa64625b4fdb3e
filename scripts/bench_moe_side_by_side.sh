#!/usr/bin/env bash
# Offline throughput of a MoE model shape with random weights (tandem/testing.py DUMMY_CONFIGS, e.g.
# qwen3-moe-small, gpt-oss-small, deepseek-v3-small) side by side on this CPU: tandem, vLLM's CPU
# build and transformers' generate, fp32, the same vLLM random dataset (same seed: the same
# prompts), 32 prompts of 256 tokens, 64 out, ignore_eos; REPS interleaved runs of tandem and vLLM.
#   usage: [REPS=2] scripts/bench_moe_side_by_side.sh SHAPE [VLLM_VENV]
# Writes benchmarks/results/moe-side-by-side-SHAPE-<UTC>.json (every run; a failed engine is noted).
set -uo pipefail
SHAPE=${1:?dummy model shape}
VLLM_VENV=${2:-/tmp/peer-vllm-cpu}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-benchmarks/results/raw}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$WORK"
W=(--num-prompts 32 --seed 0 --input-len 256 --output-len 64)
run_tandem() { .venv/bin/tandem bench throughput --model "$SHAPE" --load-format dummy "${W[@]}" --max-model-len 4096 --disable-tqdm \
  --output-json "$WORK/tandem-$STAMP-$1.json" | grep -E "Throughput"; }
MODEL_DIR=.cache/dummy/$SHAPE  # written by tandem's first run
run_vllm() { HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 "$VLLM_VENV/bin/vllm" bench throughput --model "$MODEL_DIR" \
  --load-format dummy --dataset-name random --num-prompts 32 --seed 0 --random-input-len 256 --random-output-len 64 \
  --dtype float32 --max-model-len 4096 --disable-log-stats --output-json "$WORK/vllm-$STAMP-$1.json" > "$WORK/vllm-$STAMP-$1.log" 2>&1 \
  && grep -E "Throughput" "$WORK/vllm-$STAMP-$1.log" || echo "vllm failed: $(grep -E 'Error|error' "$WORK/vllm-$STAMP-$1.log" | tail -1)"; }
for i in $(seq "${REPS:-2}"); do
  run_tandem "$i"
  run_vllm "$i"
done
"$PY" scripts/bench_transformers.py --model "$SHAPE" --load-format dummy "${W[@]}" --batch-size 16 \
  --output-json "$WORK/transformers-$STAMP.json" | tail -1
"$PY" scripts/merge_side_by_side.py "$WORK" "$STAMP" "benchmarks/results/moe-side-by-side-$SHAPE-$STAMP.json"
