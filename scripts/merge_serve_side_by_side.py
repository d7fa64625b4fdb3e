"""Collect one serving side-by-side run (see bench_serve_side_by_side.sh) into one results file:
median over repetitions of each `vllm bench serve` metric, per server."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench.throughput import describe_device, model_shape

METRICS = ["median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
           "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "output_throughput", "request_throughput", "completed"]
WORKLOAD_KEYS = ["num_prompts", "request_rate", "burstiness", "max_concurrency", "total_input_tokens",
                 "total_output_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("stamp")
    ap.add_argument("out")
    ap.add_argument("--model", required=True)
    ap.add_argument("--vllm-omp", default="default")
    ap.add_argument("--tandem-args", default="")
    args = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.work).glob(f"serve-*-{args.stamp}.json"))}
    by_server: dict[str, list[dict]] = {}
    for name, r in runs.items():
        server = re.match(r"serve-([a-z]+)-\d+-", name).group(1)
        by_server.setdefault(server, []).append(r)
    median = {s: {m: statistics.median(r[m] for r in rs) for m in METRICS} for s, rs in by_server.items()}
    first = next(iter(runs.values()))
    summary = {
        "benchmark": "serve (client: vllm bench serve, vLLM 0.32 CPU build)",
        "device": describe_device("cpu"),
        "model_shape": model_shape(args.model),
        "workload": {"dataset": "random", **{k: first.get(k) for k in WORKLOAD_KEYS}, "seed": 0,
                     "ignore_eos": True, "endpoint": "/v1/completions (streaming)"},
        "flags": {"tandem": f"tandem serve --dtype float32 --kv-cache-memory 2GiB --max-model-len 2048 {args.tandem_args}".strip(),
                  "vllm": f"vllm serve --dtype float32 --max-model-len 2048, VLLM_CPU_KVCACHE_SPACE=2, "
                          f"OMP_NUM_THREADS={args.vllm_omp}"},
        "dtype": "float32",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "repetitions": {s: len(rs) for s, rs in by_server.items()},
        "median_over_runs": median,
        "tandem_over_vllm": {m: median["tandem"][m] / median["vllm"][m] for m in METRICS
                             if "tandem" in median and "vllm" in median and median["vllm"][m]},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"median_over_runs": median, "tandem_over_vllm": summary["tandem_over_vllm"]}, indent=2))


if __name__ == "__main__":
    main()
