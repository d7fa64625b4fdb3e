#!/usr/bin/env bash
# int8 weight-only against fp32 on the ~88M benchmark Llama (dummy weights, the shape is what
# counts): offline throughput at 16 sequences of 128 in / 128 out, and batch-1 / batch-16 decode
# latency, REPS interleaved repetitions each; results in benchmarks/results/ with the device recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPS=${REPS:-3}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=benchmarks/results/int8-cpu-$stamp
mkdir -p "$out"
common=(--load-format dummy --model bench-88m --seed 0)
for rep in $(seq 1 "$REPS"); do
  for q in none int8; do
    flags=(); [[ $q == int8 ]] && flags=(--quantization int8)
    "$PY" -m tandem.cli bench throughput "${common[@]}" "${flags[@]}" --dataset-name random --input-len 128 \
      --output-len 128 --random-range-ratio 0 --num-prompts 16 --disable-tqdm \
      --output-json "$out/throughput-$q-$rep.json" > /dev/null
    for bs in 1 16; do
      "$PY" -m tandem.cli bench latency "${common[@]}" "${flags[@]}" --batch-size "$bs" --input-len 128 \
        --output-len 64 --num-iters-warmup 1 --num-iters 3 --disable-tqdm \
        --output-json "$out/latency-bs$bs-$q-$rep.json" > /dev/null
    done
  done
done
"$PY" - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def med(pattern, key):
    vals = [json.loads(p.read_text())[key] for p in sorted(out.glob(pattern))]
    return statistics.median(vals), min(vals), max(vals)
rows = {}
for q in ("none", "int8"):
    rows[q] = {"throughput_output_tok_s": med(f"throughput-{q}-*.json", "output_tokens_per_second"),
               "decode_step_ms_bs1": med(f"latency-bs1-{q}-*.json", "median_decode_step_ms"),
               "decode_step_ms_bs16": med(f"latency-bs16-{q}-*.json", "median_decode_step_ms")}
first = json.loads(next(out.glob("throughput-none-*.json")).read_text())
summary = {"benchmark": "int8 weight-only vs fp32 on a CPU", "device": first.get("device"),
           "model": first.get("model"), "runs": rows,
           "speedup_int8_over_fp32": {k: rows["none"][k][0] / rows["int8"][k][0] if "ms" in k
                                      else rows["int8"][k][0] / rows["none"][k][0] for k in rows["none"]}}
path = out.with_suffix(".json")
path.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["speedup_int8_over_fp32"], indent=2), path)
PY
