"""Structured outputs' overhead, offline: output tokens per second of a JSON-schema workload
against the same model unconstrained, at batch 1 and batch 32, in one process, side by side.

Both sides generate about the same number of tokens per request: the schema fixes the output's
length (an array of exactly 24 enum strings), the free side runs max_tokens with ignore_eos. The
grammar is compiled once before the timed runs (xgrammar's cache), and its cold compile time is
recorded apart. Writes benchmarks/results/structured-outputs-<date>.json.

    .venv/bin/python scripts/bench_structured_outputs.py [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

from tandem import LLM, SamplingParams, StructuredOutputsParams
from tandem.bench.throughput import describe_device, model_shape
from tandem.engine.arg_utils import DEMO_MODEL_DIR

ITEMS = 24
SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "minItems": ITEMS, "maxItems": ITEMS,
                                                     "items": {"enum": ["alpha", "beta", "gamma", "delta"]}}},
          "required": ["words"], "additionalProperties": False}


def _run(llm: LLM, batch: int, params: SamplingParams) -> tuple[float, int]:
    prompts = [f"def handler_{i}(request):\n    " for i in range(batch)]
    started = time.perf_counter()
    outs = llm.generate(prompts, [params.clone() for _ in prompts], use_tqdm=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output-dir", default="benchmarks/results")
    args = p.parse_args()
    llm = LLM(model=args.model, kv_cache_memory="512MiB", max_num_seqs=32)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=400,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    started = time.perf_counter()
    _, tokens = _run(llm, 1, constrained)  # cold: the grammar compiles here
    cold_s = time.perf_counter() - started
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=max(tokens, 1), ignore_eos=True)
    rows = []
    sides = {"unconstrained": free, "json_schema": constrained}
    for batch in (1, 32):
        best = dict.fromkeys(sides, 0.0)
        counts: dict[str, int] = {}
        for params in sides.values():
            _run(llm, batch, params)  # warm-up
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both sides
            for name, params in sides.items():
                seconds, counts[name] = _run(llm, batch, params)
                best[name] = max(best[name], counts[name] / seconds)
        rows.append({"batch": batch, "output_tokens_per_s": best, "output_tokens": counts,
                     "overhead": round(1 - best["json_schema"] / best["unconstrained"], 4)})
        print(rows[-1])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {"benchmark": "structured outputs overhead (offline, best of repeats)", "date": stamp,
              "device": describe_device(), "model": model_shape(args.model), "schema": SCHEMA,
              "workload": {"prompts": "def handler_i(request): (one per request)", "temperature": 0.8,
                           "unconstrained_max_tokens": free.max_tokens, "repeats": args.repeats},
              "cold_first_request_s": round(cold_s, 3), "results": rows,
              "flags": {"kv_cache_memory": "512MiB", "max_num_seqs": 32}}
    out = Path(args.output_dir) / f"structured-outputs-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
