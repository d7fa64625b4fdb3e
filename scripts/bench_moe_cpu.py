"""The torch fused-MoE paths on this CPU, one MoE layer of a model shape (default qwen3-moe-small:
hidden 512, 32 experts of 256, top 4): the per-token definition (each token's experts one after
another), the per-expert reference (``fused_moe_ref``) and ``torch._grouped_mm`` (``fused_moe_grouped``),
at several token counts; median of --iters after a warm-up.

    python scripts/bench_moe_cpu.py --output-json benchmarks/results/moe-cpu-<UTC time>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from tandem.bench.throughput import describe_device
from tandem.kernels import moe
from tandem.testing import DUMMY_CONFIGS


def per_token(x, w13, w2, weights, ids):
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.linear(x[t:t + 1], w13[e])
            out[t:t + 1] += weights[t, j] * F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
    return out


def timed(fn, args, iters: int) -> float:
    fn(*args)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-moe-small", choices=[k for k, v in DUMMY_CONFIGS.items()
                                                                  if "num_experts" in v])
    p.add_argument("--tokens", default="1,8,64,256")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    cfg = DUMMY_CONFIGS[args.shape]
    e, k, h, i = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) * 0.02, torch.randn(e, h, i, generator=g) * 0.02
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, h, generator=g)
        weights, ids = moe.softmax_topk(torch.randn(t, e, generator=g), k, renormalize=True)
        case = (x, w13, w2, weights, ids)
        row = {"tokens": t, "per_token_ms": timed(per_token, case, max(3, args.iters // 4)),
               "per_expert_ms": timed(moe.fused_moe_ref, case, args.iters),
               "grouped_mm_ms": timed(moe.fused_moe_grouped, case, args.iters)}
        rows.append(row)
        print(json.dumps(row))
    result = {"benchmark": "moe-cpu-paths", "device": describe_device("cpu"), "shape": args.shape,
              "layer": {"experts": e, "top_k": k, "hidden": h, "expert_intermediate": i}, "dtype": "float32",
              "threads": torch.get_num_threads(), "rows": rows, "iters": args.iters,
              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
