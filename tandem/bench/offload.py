"""``tandem bench offload``: what the KV offload tiers save, side by side with offloading off.

Two engines with the same flags are built in one process, one with ``--kv-offloading-size`` (the
host tier) and one without; their device pools are sized by ``--num-gpu-blocks-override`` (default:
room for about two prompts) so that revisiting evicted prefixes is the workload.

Definitions (times from ``time.perf_counter``, greedy, ``ignore_eos``, one request at a time):

* revisit: ``--num-prompts`` random prompts of ``--input-len`` ids visited once (first pass), then
  again in the same order (second pass): with a small pool each revisit finds its prefix evicted
  from the device; ``second_pass_speedup`` = offloading-off second pass time / offloading-on second
  pass time; ``second_pass_from_cache`` = prompt tokens of the second pass that came from the device
  prefix cache or a tier, over all its prompt tokens (the last token of a prompt is always computed,
  so the most a cache can give is ``(input_len - 1) // block_size`` whole blocks);
* no reuse: ``--rounds`` rounds of ``--num-prompts`` prompts never seen before, one at a time, the
  two engines alternating by round (the same prompts for both); ``no_reuse_ratio`` = offloading-on
  total time / offloading-off total time (saving runs in the offload thread, so this is its cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.bench.latency import random_prompts
from tandem.bench.throughput import bench_engine_args, default_output_json, engine_flags, resolve_bench_model, results_header
from tandem.engine.arg_utils import EngineArgs


def add_offload_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="Hugging Face model directory, or with --load-format dummy "
                                                      "a built-in shape such as bench-88m")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts per pass (default 8)")
    parser.add_argument("--input-len", type=int, default=600, help="prompt length in tokens (default 600)")
    parser.add_argument("--output-len", type=int, default=16, help="output length in tokens (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the no-reuse workload (default 3)")
    parser.add_argument("--output-json", default=None,
                        help="result file (default: benchmarks/results/offload-<model>-<UTC time>.json)")
    EngineArgs.add_cli_args(parser, model=None)
    parser.set_defaults(kv_offloading_size=1.0)
    return parser


def _visit(llm, prompts: list[list[int]], params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = [list(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompts]
    return time.perf_counter() - start, outs


def _cached_tokens(llm) -> int:
    """Prompt tokens found so far in the device prefix cache plus those loaded from a tier."""
    core = llm.llm_engine.core
    core.settle_offload()
    report = core.connector.offload_report() if core.connector is not None else None
    return core.kv.stats.hits + (sum(report.hit_tokens.values()) if report is not None else 0)


def _revisit(llm, prompts: list[list[int]], params) -> dict[str, Any]:
    first_s, first = _visit(llm, prompts, params)
    before = _cached_tokens(llm)
    second_s, second = _visit(llm, prompts, params)
    cached = _cached_tokens(llm) - before
    return {"first_pass_s": first_s, "second_pass_s": second_s, "second_pass_cached_tokens": cached,
            "second_pass_from_cache": cached / sum(len(p) for p in prompts), "same_outputs": first == second}


def run_offload(args: argparse.Namespace) -> dict[str, Any]:
    from tandem import LLM, SamplingParams

    model = resolve_bench_model(args)
    with_tier = bench_engine_args(args, model)
    if not with_tier.kv_offloading_size:
        raise ValueError("--kv-offloading-size must be > 0 (the engine with the host tier)")
    if with_tier.num_gpu_blocks_override is None:  # about two prompts with their outputs
        with_tier.num_gpu_blocks_override = 2 * -(-(args.input_len + args.output_len) // with_tier.block_size) + 2
    without = dataclasses.replace(with_tier, kv_offloading_size=None, kv_disk_path=None)
    engines = {"off": LLM(**vars(without)), "on": LLM(**vars(with_tier))}
    tokenizer = engines["on"].llm_engine.tokenizer
    vocab = engines["on"].llm_engine.runner.args.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i, llm in enumerate(engines.values()):  # warm-up on prompts of their own
        _visit(llm, random_prompts(tokenizer, vocab, 2, args.input_len, args.seed + 1000 + i), params)

    prompts = random_prompts(tokenizer, vocab, args.num_prompts, args.input_len, args.seed)
    revisit = {name: _revisit(llm, prompts, params) for name, llm in engines.items()}
    no_reuse = {"off": 0.0, "on": 0.0}
    for r in range(args.rounds):
        fresh = random_prompts(tokenizer, vocab, args.num_prompts, args.input_len, args.seed + 1 + r)
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            no_reuse[name] += _visit(engines[name], fresh, params)[0]
    llm = engines["on"]
    runner = llm.llm_engine.runner
    results = {
        **results_header("offload", model, runner),
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "rounds": args.rounds, "seed": args.seed, "one_request_at_a_time": True,
                     "sampling": {"temperature": 0.0, "ignore_eos": True}},
        "flags": {**engine_flags(with_tier), "resolved": {"num_kv_blocks": runner.num_blocks,
                                                          "block_size": runner.block_size}},
        "revisit": revisit,
        "second_pass_speedup": revisit["off"]["second_pass_s"] / revisit["on"]["second_pass_s"],
        "second_pass_from_tier_or_cache": revisit["on"]["second_pass_from_cache"],
        "no_reuse_s": no_reuse,
        "no_reuse_ratio": no_reuse["on"] / no_reuse["off"],
        "offload_stats": _stats(llm),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.output_json) if args.output_json else default_output_json(model, kind="offload")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=4) + "\n")
    print(f"second pass: {revisit['off']['second_pass_s']:.2f} s without offloading, "
          f"{revisit['on']['second_pass_s']:.2f} s with ({results['second_pass_speedup']:.2f}x), "
          f"{100 * results['second_pass_from_tier_or_cache']:.0f}% of its prompt tokens cached; "
          f"no reuse: {results['no_reuse_ratio']:.3f}x the time")
    print(f"Results written to {out}")
    return {**results, "output_json": str(out)}


def _stats(llm) -> dict[str, Any]:
    core = llm.llm_engine.core
    core.settle_offload()
    report = core.connector.offload_report()
    return {f: getattr(report, f) for f in report.__struct_fields__}
