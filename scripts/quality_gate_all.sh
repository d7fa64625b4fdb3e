#!/usr/bin/env bash
# The quality gate (tandem eval quality) for every online scheme and every shipped policy on a
# model (default: the demo model), each result in benchmarks/results/quality-<choice>-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-models/tandem-demo}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
run() {  # name, flags...
  local name=$1; shift
  "$PY" -m tandem.cli eval quality "$MODEL" "$@" --output-json "benchmarks/results/quality-$name-$stamp.json" \
    --max-ppl-ratio "${MAX_PPL_RATIO:-1.03}" || echo "quality gate failed: $name"
}
for q in fp8 int8 mxfp4 nvfp4; do run "$q" --quantization "$q"; done
for p in examples/policies/*.yaml; do run "policy-$(basename "$p" .yaml)" --precision-policy "$p"; done
run bf16 --dtype bfloat16
MAX_PPL_RATIO=1.05 run kv-fp8 --kv-cache-dtype fp8
MAX_PPL_RATIO=1.05 run kv-fp8-e5m2 --kv-cache-dtype fp8_e5m2
