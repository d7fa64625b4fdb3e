"""Merge scripts/bench_disagg.sh runs (one or several repeats of the same setups) into
benchmarks/results/disagg-interference-<UTC>.json.

    python scripts/merge_disagg.py RAW_DIR [RAW_DIR ...] --model MODEL_DIR

Per setup: each run's chat and document latencies, goodput and server counters; across runs the
median (and range) of the headline figures; and goodput recomputed from the per-request samples
of all runs pooled over a grid of SLOs, so no single SLO choice decides the comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench.throughput import describe_device, model_shape

SETUPS = {"pd": "tandem up --prefill 1 --decode 1 (cost-based P/D decider)",
          "replicas": "tandem up --replicas 2 (cache-aware, colocated)",
          "single": "tandem serve (one replica, chunked prefill, all cores)",
          "pd-threshold": "tandem up --prefill 1 --decode 1 --pd-threshold 512 (llm-d's fixed rule), optional",
          "pd-w3": "tandem up --prefill 1 --decode 1 --pd-interference-weight 3 (PD_ONLY run, renamed), optional",
          "pd-w8": "tandem up --prefill 1 --decode 1 --pd-interference-weight 8 (PD_ONLY run, renamed), optional"}
KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p90_itl_ms",
        "p99_itl_ms", "completed")
HEADLINE = {"chat_p99_itl_ms": ("chat", "p99_itl_ms"), "chat_median_itl_ms": ("chat", "median_itl_ms"),
            "chat_median_ttft_ms": ("chat", "median_ttft_ms"), "long_median_ttft_ms": ("long", "median_ttft_ms"),
            "request_goodput": (None, "request_goodput"), "output_throughput": (None, "output_throughput")}
SLO_TTFT_MS = (1000, 1500, 2000, 2500, 3000)
SLO_TPOT_MS = (100, 150)


def counters(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^([a-z_:]+?)(\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M):
        if name.startswith(("tandem", "vllm:num_preemptions")):
            key = name + (labels or "")
            out[key] = out.get(key, 0.0) + float(value)
    return out


def run_entry(raw: Path, name: str, res: dict) -> dict:
    groups = res.get("groups", {})
    entry = {"raw": str(raw),
             "chat": {k: groups.get("chat", {}).get(k) for k in KEYS},
             "long": {k: groups.get("long", {}).get(k) for k in KEYS},
             "request_goodput": res.get("request_goodput"), "output_throughput": res.get("output_throughput"),
             "request_throughput": res.get("request_throughput"), "duration": res.get("duration")}
    for f in sorted(raw.glob(f"{name}.*metrics.txt")):
        entry.setdefault("server_counters", {})[f.name] = {k: v for k, v in counters(f.read_text()).items()
                                                            if "bucket" not in k and "created" not in k}
    return entry


def headline(run: dict, key: str) -> float | None:
    group, field = HEADLINE[key]
    return (run[group] if group else run).get(field)


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in HEADLINE:
        values = [v for v in (headline(r, key) for r in runs) if v is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def request_samples(res: dict) -> list[tuple[float, float]]:
    """(TTFT ms, TPOT ms) of each successful request; TPOT as vLLM's goodput defines it."""
    out = []
    for ttft, e2el, n, err in zip(res["ttfts"], res["e2els"], res["output_lens"], res["errors"]):
        if err or not n:
            continue
        out.append((ttft * 1000, (e2el - ttft) * 1000 / (n - 1) if n > 1 else 0.0))
    return out


def goodput_grid(results: list[dict]) -> dict:
    """Good requests per second over all runs pooled, at each (TTFT, TPOT) SLO pair."""
    samples = [s for res in results for s in request_samples(res)]
    seconds = sum(res["duration"] for res in results)
    total = sum(len(res["ttfts"]) for res in results)
    grid = {}
    for ttft in SLO_TTFT_MS:
        for tpot in SLO_TPOT_MS:
            good = sum(t <= ttft and p <= tpot for t, p in samples)
            grid[f"ttft{ttft}_tpot{tpot}"] = {"goodput_req_s": good / seconds, "fraction_good": good / total}
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="+", type=Path, help="output directories of scripts/bench_disagg.sh")
    parser.add_argument("--model", required=True, help="the model directory the runs served")
    args = parser.parse_args()
    setups, first = {}, None
    for name, desc in SETUPS.items():
        results = [(raw, json.loads((raw / f"{name}.json").read_text())) for raw in args.raw
                   if (raw / f"{name}.json").exists()]
        if not results:
            continue
        first = first or results[0][1]
        runs = [run_entry(raw, name, res) for raw, res in results]
        setups[name] = {"setup": desc, "num_runs": len(runs), "summary": summary(runs),
                        "goodput_by_slo": goodput_grid([res for _, res in results]), "runs": runs}
    p99 = {name: s["summary"]["chat_p99_itl_ms"]["median"] for name, s in setups.items()}
    out = {"benchmark": "disaggregated prefill/decode under interference", "date": datetime.now(UTC).isoformat(),
           "device": describe_device("cpu"), "model": model_shape(args.model),
           "workload": {k: first.get(k) for k in ("dataset_name", "num_prompts", "request_rate", "goodput_slos_ms",
                                                   "workload", "flags") if k in first},
           "script": "scripts/bench_disagg.sh, then scripts/merge_disagg.py over the repeats",
           "setups": setups,
           "chat_p99_itl_colocated_over_pd": {  # medians over the runs; > 1: disaggregation's tail is lower
               f"{other}/{pd}": p99[other] / p99[pd] for pd in p99 if pd.startswith("pd")
               for other in ("replicas", "single") if other in p99}}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path("benchmarks/results") / f"disagg-interference-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)
    for name, s in setups.items():
        m = {k: v["median"] for k, v in s["summary"].items()}
        print(f"{name:9} runs {s['num_runs']}  chat ITL p50 {m['chat_median_itl_ms']:.0f} "
              f"p99 {m['chat_p99_itl_ms']:.0f} [{s['summary']['chat_p99_itl_ms']['min']:.0f}-"
              f"{s['summary']['chat_p99_itl_ms']['max']:.0f}] ms  chat TTFT p50 {m['chat_median_ttft_ms']:.0f}  "
              f"doc TTFT p50 {m['long_median_ttft_ms']:.0f}  goodput {m['request_goodput']:.2f} "
              f"[{s['summary']['request_goodput']['min']:.2f}-{s['summary']['request_goodput']['max']:.2f}]  "
              f"out tok/s {m['output_throughput']:.1f}")
        print("          goodput by SLO (pooled):",
              "  ".join(f"{k} {v['goodput_req_s']:.2f}" for k, v in s["goodput_by_slo"].items()))
    print("chat p99 ITL, colocated / disaggregated (medians):", out["chat_p99_itl_colocated_over_pd"])


if __name__ == "__main__":
    main()
