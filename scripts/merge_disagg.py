"""Merge one scripts/bench_disagg.sh run into benchmarks/results/disagg-interference-<UTC>.json.

    python scripts/merge_disagg.py RAW_DIR MODEL_DIR
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
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


def counters(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^([a-z_:]+?)(\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M):
        if name.startswith(("tandem", "vllm:num_preemptions")):
            key = name + (labels or "")
            out[key] = out.get(key, 0.0) + float(value)
    return out


def main() -> None:
    raw, model = Path(sys.argv[1]), sys.argv[2]
    setups = {}
    for name, desc in SETUPS.items():
        if not (raw / f"{name}.json").exists():
            continue
        res = json.loads((raw / f"{name}.json").read_text())
        groups = res.get("groups", {})
        entry = {"setup": desc,
                 "chat": {k: groups.get("chat", {}).get(k) for k in KEYS},
                 "long": {k: groups.get("long", {}).get(k) for k in KEYS},
                 "request_goodput": res.get("request_goodput"), "output_throughput": res.get("output_throughput"),
                 "request_throughput": res.get("request_throughput"), "duration": res.get("duration")}
        for f in sorted(raw.glob(f"{name}.*metrics.txt")):
            entry.setdefault("server_counters", {})[f.name] = {k: v for k, v in counters(f.read_text()).items()
                                                                if "bucket" not in k and "created" not in k}
        setups[name] = entry
    base = setups["replicas"]["chat"]["p99_itl_ms"], setups["single"]["chat"]["p99_itl_ms"]
    pd = setups["pd"]["chat"]["p99_itl_ms"]
    first = json.loads((raw / "pd.json").read_text())
    out = {"benchmark": "disaggregated prefill/decode under interference", "date": datetime.now(timezone.utc).isoformat(),
           "device": describe_device("cpu"), "model": model_shape(model),
           "workload": {k: first.get(k) for k in ("dataset_name", "num_prompts", "request_rate", "goodput_slos_ms")
                        if k in first} | {"args": first.get("args")},
           "setups": setups,
           "chat_p99_itl_ratio": {"replicas_over_pd": base[0] / pd if pd else None,
                                  "single_over_pd": base[1] / pd if pd else None}}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path("benchmarks/results") / f"disagg-interference-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)
    for name, s in setups.items():
        print(f"{name:9} chat ITL p50 {s['chat']['median_itl_ms']:.0f} p99 {s['chat']['p99_itl_ms']:.0f} ms  "
              f"TPOT p50 {s['chat']['median_tpot_ms']:.0f}  chat TTFT p50 {s['chat']['median_ttft_ms']:.0f}  "
              f"long TTFT p50 {s['long']['median_ttft_ms']:.0f}  goodput {s['request_goodput']}  "
              f"out tok/s {s['output_throughput']:.1f}")
    print("chat p99 ITL ratio:", out["chat_p99_itl_ratio"])


if __name__ == "__main__":
    main()
