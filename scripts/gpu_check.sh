#!/usr/bin/env bash
# Issue 8's GPU checks as one device run (no GPU has been lent yet; nothing here has run on one).
# The H200 image has torch, triton, transformers, tokenizers, safetensors, jinja2, numpy, httpx;
# the one package these checks need beyond it is msgspec: `bash scripts/gpu_wheels.sh` puts its Python 3.12
# wheel in .whl (checked: with fastapi, pydantic, uvicorn, zmq and openai blocked, the engine still runs).
#   device run:  bash scripts/gpu_check.sh [STAGE]   (carry: [".whl"]; results land in $OUT)
# STAGE: kernels | latency | throughput | floor | all (default). One device call may run 10 minutes at most:
# call the stages one by one when all of them would not fit (kernels ~3 min with Triton compiles,
# latency <= 4 min, throughput <= 2 x 4 min, sync then async scheduling; floor: transformers'
# generate on the same shape and GPU, 256 prompts, <= 5 min).
# 1. every Triton kernel compiled for the GPU against its torch reference, and whole models on the
#    Triton backend token for token against the torch backend (tests/kernels/test_triton_kernels.py); the
#    Triton backend with CUDA graphs vs eager torch and transformers on the GPU, and one host sync per
#    decode step (tests/engine/test_gpu.py);
# 2. Llama-3.1-8B shape, bf16, random weights: batch-1 decode (decode_bandwidth_fraction, TTFT of
#    one 512-token prompt = median_prefill_s) and 512 in / 128 out x 1000 prompts throughput.
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
B=(--load-format dummy --model llama-3.1-8b --dtype bfloat16 --attention-backend triton --disable-tqdm)
if [[ $STAGE == all || $STAGE == kernels ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py tests/kernels/test_moe_kernels.py \
    tests/engine/test_gpu.py tests/unit/test_sampler.py 2>&1 \
    | tail -25 | tee "$OUT/kernels.txt"
fi
if [[ $STAGE == all || $STAGE == latency ]]; then
  timeout 240 python3 -m tandem.cli bench latency "${B[@]}" --batch-size 1 --input-len 512 --output-len 128 \
    --num-iters-warmup 2 --num-iters 5 --output-json "$OUT/latency-8b-b1.json" 2>&1 | tail -5
fi
if [[ $STAGE == all || $STAGE == throughput ]]; then
  timeout 240 python3 -m tandem.cli bench throughput "${B[@]}" --input-len 512 --output-len 128 --num-prompts 1000 \
    --output-json "$OUT/throughput-8b-512-128.json" 2>&1 | tail -5
  timeout 240 python3 -m tandem.cli bench throughput "${B[@]}" --async-scheduling --input-len 512 --output-len 128 \
    --num-prompts 1000 --output-json "$OUT/throughput-8b-512-128-async.json" 2>&1 | tail -5
fi
if [[ $STAGE == all || $STAGE == floor ]]; then
  timeout 300 python3 scripts/bench_transformers.py --load-format dummy --model llama-3.1-8b --device cuda \
    --dtype bfloat16 --num-prompts 256 --input-len 512 --output-len 128 --batch-size 64 \
    --output-json "$OUT/transformers-8b-512-128.json" 2>&1 | tail -5
fi
