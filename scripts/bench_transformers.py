"""Floor for `tandem bench throughput`: Hugging Face transformers' batched `generate` on the same requests.

Same random dataset (vLLM's RandomDataset, same seed) as `tandem bench throughput`. Requests are
taken in arrival order in static batches of --batch-size, left-padded; each batch generates exactly
the longest requested output in it (min_new_tokens = max_new_tokens, i.e. ignore_eos) and only the
requested tokens are counted as output, so the numbers are comparable to vLLM's and tandem's.

    python scripts/bench_transformers.py --model DIR --num-prompts 64 --input-len 288 --output-len 144 \
        --random-range-ratio 0.75 --batch-size 16 --output-json benchmarks/results/x.json

On a GPU, the floor for the 8B shape with random weights (nothing to download):

    python scripts/bench_transformers.py --load-format dummy --model llama-3.1-8b --device cuda \
        --dtype bfloat16 --num-prompts 256 --input-len 512 --output-len 128 --batch-size 64 --output-json X
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from tandem.bench.throughput import _range_ratio, describe_device, model_shape, resolve_bench_model, sample_random_requests
from tandem.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=288)
    p.add_argument("--output-len", type=int, default=144)
    p.add_argument("--random-range-ratio", type=_range_ratio, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-json", required=True)
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights of the config (--model may name a built-in shape, e.g. llama-3.1-8b)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args()
    args.model = resolve_bench_model(args)

    tok = load_tokenizer(args.model)
    requests, _ = sample_random_requests(tok, args.num_prompts, args.input_len, args.output_len,
                                         args.random_range_ratio, args.seed)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(args.model)
        with device:  # initialised where it runs: an 8B model is not built on the host first
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start = time.perf_counter()
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i:i + args.batch_size]
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids, device=device)
            mask[row, width - r.prompt_len:] = 1
        new = max(r.expected_output_len for r in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(r.expected_output_len for r in requests)
    res = {
        "engine": f"transformers {transformers.__version__} generate, static batches of {args.batch_size}",
        "model_id": args.model,
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "device": describe_device(device),
        "model_shape": model_shape(args.model) | {"num_params": sum(p.numel() for p in model.parameters())},
        "dtype": args.dtype,
        "workload": {"dataset": "random", "input_len": args.input_len, "output_len": args.output_len,
                     "random_range_ratio": args.random_range_ratio, "num_prompts": args.num_prompts,
                     "seed": args.seed, "total_prompt_tokens": prompt_tokens,
                     "total_output_tokens": output_tokens},
        "flags": {"batch_size": args.batch_size, "load_format": args.load_format},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(res, indent=4) + "\n")
    print(f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total tokens/s, "
          f"{res['output_tokens_per_second']:.2f} output tokens/s")


if __name__ == "__main__":
    main()
