"""TTFT of split requests with the two legs sent one after the other vs at once (pending tickets),
on `tandem up --prefill 1 --decode 1 --pd-threshold 1` while the decode worker carries steady
decode streams. Fleets of both modes alternate; each measures requests sent one at a time.

    python scripts/bench_pd_concurrent.py MODEL_DIR [--rounds 2] [--requests 16] [--prompt-len 256]

Writes benchmarks/results/pd-concurrent-legs-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tandem.bench.throughput import describe_device, model_shape

PORT = 8531
WORKER = "--max-num-seqs 16 --max-num-batched-tokens 512 --kv-cache-memory 1GiB --served-model-name m"


def start_fleet(model: str, concurrent: bool) -> subprocess.Popen:
    flag = "--pd-concurrent" if concurrent else "--no-pd-concurrent"
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", model, "--prefill", "1", "--decode", "1",
                             "--port", str(PORT), "--pd-threshold", "1", flag, "--worker-args", WORKER],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("fleet did not come up")


def stop_fleet(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def ttft(client: httpx.Client, prompt: list[int], max_tokens: int) -> float:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start, first = time.perf_counter(), None
    with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():  # read to the end: the next request starts on an idle connection
            if first is None and line.startswith("data: {") and '"text"' in line:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"no token (HTTP {r.status_code})")
    return first


def measure(model: str, concurrent: bool, args, rng: random.Random) -> list[float]:
    proc = start_fleet(model, concurrent)
    stop = threading.Event()
    try:
        with httpx.Client() as client:
            ttft(client, [rng.randrange(10, 8000) for _ in range(64)], 2)  # teaches the router P's endpoint

            def background():
                with httpx.Client() as c:
                    while not stop.is_set():
                        ttft(c, [rng.randrange(10, 8000) for _ in range(32)], 200)

            threads = [threading.Thread(target=background, daemon=True) for _ in range(args.streams)]
            for t in threads:
                t.start()
            time.sleep(3)
            out = [ttft(client, [rng.randrange(10, 8000) for _ in range(args.prompt_len)], 2)
                   for _ in range(args.requests)]
            stop.set()
            for t in threads:
                t.join(60)
            return out
    finally:
        stop_fleet(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--streams", type=int, default=4, help="background decode streams on the decode worker")
    args = ap.parse_args()
    rng = random.Random(0)
    samples: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for r in range(args.rounds):
        for mode in ("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential"):
            got = measure(args.model, mode == "concurrent", args, rng)
            samples[mode] += got
            print(mode, f"median TTFT {statistics.median(got) * 1e3:.0f} ms", flush=True)
    summary = {m: {"median_ttft_ms": statistics.median(v) * 1e3, "mean_ttft_ms": statistics.mean(v) * 1e3,
                   "p90_ttft_ms": sorted(v)[int(0.9 * (len(v) - 1))] * 1e3, "n": len(v)} for m, v in samples.items()}
    out = {"benchmark": "split-request TTFT: prefill and decode legs sequential vs concurrent (pending tickets)",
           "date": datetime.now(UTC).isoformat(), "device": describe_device("cpu"),
           "model": model_shape(args.model),
           "workload": {"prompt_len": args.prompt_len, "requests_per_fleet": args.requests, "rounds": args.rounds,
                        "background_streams": args.streams, "background": "32-token prompts, 200 tokens out",
                        "measured": "stream=true, max_tokens 2, one request at a time, time to first token"},
           "flags": {"fleet": "tandem up --prefill 1 --decode 1 --pd-threshold 1", "worker_args": WORKER},
           "summary": summary,
           "ratio_sequential_over_concurrent_median": summary["sequential"]["median_ttft_ms"]
           / summary["concurrent"]["median_ttft_ms"],
           "samples_ms": {m: [x * 1e3 for x in v] for m, v in samples.items()}}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path("benchmarks/results") / f"pd-concurrent-legs-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=1), path)


if __name__ == "__main__":
    main()
