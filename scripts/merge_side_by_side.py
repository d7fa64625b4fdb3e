"""Collect one side-by-side run's JSON files (see bench_cpu_side_by_side.sh) into one results file."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def main(work: str, stamp: str, out: str) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(work).glob(f"*-{stamp}*.json"))}
    tandem = next(r for name, r in runs.items() if name.startswith("tandem"))
    by_engine: dict[str, list[float]] = {}
    for name, r in runs.items():
        engine = re.sub(r"-\d+$", "", name.replace(f"-{stamp}", ""))  # vllm-STAMP-omp2-1 -> vllm-omp2
        tok = r.get("output_tokens_per_second")
        if tok is None:  # vLLM writes total tokens/s only; output tokens are the same requested lengths
            tok = r["tokens_per_second"] * tandem["workload"]["total_output_tokens"] / r["total_num_tokens"]
        by_engine.setdefault(engine, []).append(tok)
    median = {e: statistics.median(v) for e, v in by_engine.items()}
    summary = {
        "device": tandem["device"],
        "model_shape": tandem["model_shape"],
        "workload": tandem["workload"],
        "dtype": tandem.get("dtype", "float32"),
        "date": tandem["date"],
        "output_tokens_per_second": by_engine,
        "median_output_tokens_per_second": median,
        "range_output_tokens_per_second": {e: [min(v), max(v)] for e, v in by_engine.items()},
        "tandem_vs": {e: median["tandem"] / m for e, m in median.items() if e != "tandem"},
        "notes": "tandem: defaults (on a CPU the attention backend 'cpu': tandem's C++ kernels); "
                 "tandem-torchattn: --attention-backend torch (the torch references). vllm-default: vLLM CPU reduces torch to 1 thread for its engine core; vllm-omp2: "
                 "OMP_NUM_THREADS=2. transformers: static batches of 16, left-padded, only requested "
                 "tokens counted. vLLM output tok/s = its total tok/s x output share (same requests).",
        "runs": runs,
    }
    Path(out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"median_output_tokens_per_second": median, "tandem_vs": summary["tandem_vs"]}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
