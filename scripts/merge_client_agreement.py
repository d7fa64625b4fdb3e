"""Merge one bench_client_agreement.sh run: per server, each client's median (over repetitions)
of median TTFT / TPOT / ITL / E2EL, and tandem-client / vllm-client ratios."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench.throughput import describe_device, model_shape

METRICS = ["median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "p99_ttft_ms", "p99_tpot_ms",
           "output_throughput", "completed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("stamp")
    ap.add_argument("out")
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    runs: dict[str, dict] = {}
    table: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(Path(args.work).glob(f"agree-*-{args.stamp}.json")):
        server, client = re.match(r"agree-([a-z]+)-([a-z]+)client-\d+-", path.name).groups()
        data = json.loads(path.read_text())
        runs[path.stem] = {m: data.get(m) for m in METRICS}
        table.setdefault(server, {}).setdefault(client, []).append(data)
    medians = {s: {c: {m: statistics.median(r[m] for r in rs) for m in METRICS} for c, rs in clients.items()}
               for s, clients in table.items()}
    ratios = {s: {m: c["tandem"][m] / c["vllm"][m] for m in METRICS if c["vllm"][m]}
              for s, c in medians.items() if {"tandem", "vllm"} <= set(c)}
    summary = {
        "benchmark": "client agreement: tandem bench serve vs vllm bench serve (vLLM 0.32 CPU build), "
                     "same server, same workload, alternating",
        "device": describe_device("cpu"),
        "model_shape": model_shape(args.model),
        "workload": {k: next(iter(next(iter(table.values())).values()))[0].get(k)
                     for k in ("num_prompts", "request_rate", "burstiness", "total_input_tokens")},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "median_over_repetitions": medians,
        "tandem_client_over_vllm_client": ratios,
        "within_15_percent": {s: all(abs(r[m] - 1) <= 0.15 for m in ("median_ttft_ms", "median_tpot_ms"))
                              for s, r in ratios.items()},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"tandem_client_over_vllm_client": ratios, "within_15_percent": summary["within_15_percent"]},
                     indent=2))


if __name__ == "__main__":
    main()
