"""Router benchmark: a shared-prefix workload on `tandem up --replicas 2`, once per routing setup.

Setups: tandem's router with `round-robin`, with `cache-aware`, and (when its venv exists)
sglang-router's `cache_aware` policy in front of the same kind of workers. Every setup gets a fresh
fleet (empty caches). The KV cache of each worker is sized to hold about half the groups' system
prompts, so where a prefix lands decides whether it is still cached when its group comes back.

    python scripts/bench_router.py MODEL_DIR [--sglang-venv /tmp/sgl-router-venv]

Writes benchmarks/results/router-shared-prefix-<UTC>.json (raw runs under benchmarks/results/raw/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tandem.bench.serve import build_parser_for_tests
from tandem.bench.serve_datasets import build_requests
from tandem.bench.throughput import describe_device, model_shape

RAW = Path("benchmarks/results/raw")
BLOCK = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout_s: float = 600) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited; see {log}")
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not seen in {log}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def workload_flags(args) -> list[str]:
    return ["--dataset-name", "shared-prefix", "--num-prompts", str(args.num_prompts),
            "--shared-prefix-num-groups", str(args.groups), "--shared-prefix-system-len", str(args.system_len),
            "--shared-prefix-question-len", str(args.question_len),
            "--shared-prefix-output-len", str(args.output_len),
            "--request-rate", str(args.rate), "--seed", "0", "--ignore-eos"]


def best_hit_rate(args) -> float:
    """Hit rate if every group's first request misses and every later one reuses the group's
    whole block-aligned common prefix (the most any placement can get)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ns = build_parser_for_tests().parse_args(["--model", "bench", *workload_flags(args)])
    prompts: dict[str, list[list[int]]] = {}
    for r in build_requests(tok, ns):
        prompts.setdefault(r.group, []).append(tok.encode((r.system or "") + r.prompt))
    hits = total = 0
    for ids in prompts.values():
        common = min(len(os.path.commonprefix([ids[0], other])) for other in ids) if len(ids) > 1 else 0
        for other in ids[1:]:
            hits += min(common, len(other) - 1) // BLOCK * BLOCK
        total += sum(len(i) for i in ids)
    return hits / total


def run_setup(name: str, args, stamp: str) -> dict:
    port = free_port()
    log = RAW / f"router-{name}-{stamp}.log"
    policy = "round-robin" if name == "sglang-cache-aware" else name
    worker_args = f"--kv-cache-memory {args.kv_cache_memory} --max-model-len 2048 --served-model-name bench"
    fleet = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", args.model, "--replicas", "2",
                              "--policy", policy, "--port", str(port), "--worker-args", worker_args],
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    front = None
    try:
        workers = wait_for(r"tandem up: \d+ workers \(([^)]*)\)", log, fleet).group(1).split(", ")
        target = f"http://127.0.0.1:{port}"
        if name == "sglang-cache-aware":
            sport = free_port()
            front = subprocess.Popen([f"{args.sglang_venv}/bin/python", "-m", "sglang_router.launch_router",
                                      "--worker-urls", *workers, "--policy", "cache_aware", "--port", str(sport),
                                      "--prometheus-port", str(free_port()), "--log-level", "warn"],
                                     stdout=(RAW / f"router-sglang-{stamp}.log").open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
            target = f"http://127.0.0.1:{sport}"
            wait_healthy(target, front)
        out = f"router-{name}-{stamp}.json"
        cmd = [sys.executable, "-m", "tandem.cli", "bench", "serve", "--backend", "openai", "--base-url", target,
               "--model", "bench", "--tokenizer", args.model, "--disable-tqdm", *workload_flags(args),
               *[x for w in workers for x in ("--metrics-url", w)],
               "--save-result", "--result-dir", str(RAW), "--result-filename", out]
        print(f"== {name}", flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads((RAW / out).read_text())
        router_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text if name != "sglang-cache-aware" else ""
        return summarize(result, router_metrics)
    finally:
        if front is not None:
            stop(front)
        stop(fleet)


def summarize(result: dict, router_metrics: str) -> dict:
    keep = ("completed", "failed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
            "median_tpot_ms", "mean_e2el_ms", "output_throughput", "request_throughput")
    out = {k: result.get(k) for k in keep}
    out["prefix_cache_hit_rate"] = result["server_metrics"]["prefix_cache_hit_rate"]

    def counter(name: str, label: str = "") -> float:
        return sum(float(v) for v in re.findall(rf"^{name}_total(?:{{[^}}]*{label}[^}}]*}})? ([0-9.eE+-]+)$",
                                                 router_metrics, re.M))

    if router_metrics:
        prompt = counter("tandem_router_prompt_tokens")
        out["router_predicted_hit_rate"] = counter("tandem_router_predicted_cached_tokens") / prompt if prompt else None
        out["router_reported_hit_rate"] = counter("tandem_router_reported_cached_tokens") / prompt if prompt else None
        out["requests_by_worker"] = {w: float(v) for w, v in re.findall(
            r'^tandem_router_requests_total{[^}]*worker="([^"]+)"[^}]*} ([0-9.eE+-]+)$', router_metrics, re.M)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sglang-venv", default="/tmp/sgl-router-venv")
    ap.add_argument("--setups", default="round-robin,cache-aware,sglang-cache-aware")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=56)
    ap.add_argument("--groups", type=int, default=7)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.8)
    ap.add_argument("--kv-cache-memory", default="128MiB", help="per worker: about half the groups' prompts")
    args = ap.parse_args()
    RAW.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    setups = [s for s in args.setups.split(",")
              if s != "sglang-cache-aware" or Path(args.sglang_venv, "bin/python").exists()]
    runs: dict[str, list[dict]] = {s: [] for s in setups}
    for rep in range(args.reps):
        for s in setups:
            runs[s].append(run_setup(s, args, f"{stamp}-{rep}"))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                                                                "mean_tpot_ms", "prefix_cache_hit_rate")}
           for s, rs in runs.items()}
    best = best_hit_rate(args)
    summary = {
        "benchmark": "router: shared-prefix workload on tandem up --replicas 2 (one torch thread per worker)",
        "device": describe_device("cpu"),
        "model_shape": model_shape(args.model),
        "workload": {"dataset": "shared-prefix", "num_prompts": args.num_prompts, "groups": args.groups,
                     "system_len": args.system_len, "question_len": args.question_len,
                     "output_len": args.output_len, "request_rate": args.rate, "arrivals": "poisson, seed 0",
                     "kv_cache_memory_per_worker": args.kv_cache_memory},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "best_possible_hit_rate": best,
        "median_over_repetitions": med,
        "ratios": {f"mean_ttft {s} / cache-aware": med[s]["mean_ttft_ms"] / med["cache-aware"]["mean_ttft_ms"]
                   for s in med if s != "cache-aware" and "cache-aware" in med},
        "hit_rate_vs_best": {s: m["prefix_cache_hit_rate"] / best for s, m in med.items()},
        "runs": runs,
    }
    path = Path(f"benchmarks/results/router-shared-prefix-{stamp}.json")
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("best_possible_hit_rate", "median_over_repetitions", "ratios",
                                              "hit_rate_vs_best")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
