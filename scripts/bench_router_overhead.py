"""What the router adds to a request: `tandem up --replicas 1`, then the same short requests sent
alternately to the worker directly and through the router, one at a time (the order flips
every request; prompts differ so neither path gets prefix-cache hits).

    python scripts/bench_router_overhead.py MODEL_DIR [--requests 100]

Prints and writes benchmarks/results/router-overhead-<UTC>.json: median and p90 time to first
streamed byte and total latency, direct vs routed, and the router's own routing-latency histogram.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_router import RAW, free_port, stop, wait_for

from tandem.bench.throughput import describe_device, model_shape


def one(http: httpx.Client, url: str, prompt: str) -> tuple[float, float]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": 4, "stream": True, "temperature": 0}
    start = time.perf_counter()
    first = None
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for _ in r.iter_bytes():
            first = first or time.perf_counter()
    return (first - start) * 1e3, (time.perf_counter() - start) * 1e3


def quantiles(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs), "p90_ms": statistics.quantiles(xs, n=10)[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    RAW.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    port, log = free_port(), RAW / f"router-overhead-{stamp}.log"
    fleet = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", args.model, "--replicas", "1", "--port",
                              str(port), "--worker-args", "--served-model-name bench --max-model-len 2048"],
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker = wait_for(r"tandem up: \d+ workers \(([^)]*)\)", log, fleet).group(1)
        router = f"http://127.0.0.1:{port}"
        samples: dict[str, list[tuple[float, float]]] = {"direct": [], "routed": []}
        with httpx.Client(timeout=60) as http:
            for i in range(args.requests + 5):
                paths = [("direct", worker), ("routed", router)]
                for name, url in paths if i % 2 else paths[::-1]:
                    # a distinct first block per request: no prefix-cache hit on either path
                    ttfb, total = one(http, url, f"{name} {i}: " + "the quick brown fox " * 8)
                    if i >= 5:  # the first few warm up both paths
                        samples[name].append((ttfb, total))
            text = http.get(f"{router}/metrics").text
    finally:
        stop(fleet)
    count = float(re.search(r"^tandem_router_routing_latency_seconds_count ([0-9.eE+-]+)$", text, re.M).group(1))
    total_s = float(re.search(r"^tandem_router_routing_latency_seconds_sum ([0-9.eE+-]+)$", text, re.M).group(1))
    result = {
        "benchmark": "router overhead: same worker, direct vs through tandem router (cache-aware), "
                     "sequential streamed completions, ~40-token prompts, 4 output tokens",
        "device": describe_device("cpu"),
        "model_shape": model_shape(args.model),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "requests_each": args.requests,
        "first_byte": {n: quantiles([s[0] for s in xs]) for n, xs in samples.items()},
        "total": {n: quantiles([s[1] for s in xs]) for n, xs in samples.items()},
        "router_routing_latency_mean_ms": 1e3 * total_s / count,
    }
    result["added_median_first_byte_ms"] = result["first_byte"]["routed"]["median_ms"] - \
        result["first_byte"]["direct"]["median_ms"]
    path = Path(f"benchmarks/results/router-overhead-{stamp}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
