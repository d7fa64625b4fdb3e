"""``tandem bench spec``: speculative decoding side by side with none, at batch 1 and a full batch.

Three engines with the same flags are built in one process: no speculation (``off``), speculation
with every proposal verified (``fixed``: ``adaptive`` false, what vLLM does) and the adaptive
planner (``adaptive``, tandem's default). The speculative config is ``--speculative-config`` (default
n-gram, 4 tokens). Rounds alternate the engines' order. Before each case every engine runs it once
(``--warmup full``), so the adaptive planner is measured once it has learned that load (``short``:
two prompts, the planner still learning during the measured rounds).

Workloads (text from ``--text``, default the demo model's held-out sample; greedy, ``ignore_eos``):

* code: windows of the text as prompts (``--input-len`` tokens), the model continues them;
* copy: an edit, as in a code assistant: a window followed by a blank line and the window's first
  quarter, so that the continuation can copy the text above.

Batch 1 runs ``--num-prompts`` requests one at a time; batch N submits ``--batch-size`` at once
(a comma-separated list sweeps the concurrency: one case per size).
Figures: output tokens per second (total time of the round), and acceptance length (1 + accepted
over verified steps with drafts). ``same_outputs``: every engine produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.bench.throughput import bench_engine_args, default_output_json, engine_flags, resolve_bench_model, results_header
from tandem.engine.arg_utils import DEMO_MODEL_DIR, EngineArgs

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def add_spec_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--text", default=str(DEMO_MODEL_DIR / "heldout-sample.txt"),
                        help="text the prompts are cut from (default: the demo model's held-out sample)")
    parser.add_argument("--num-prompts", type=int, default=4, help="requests at batch 1 (default 4)")
    parser.add_argument("--batch-size", type=_batch_sizes, default=[32], metavar="N[,N...]",
                        help="requests at once in the batched run; a comma-separated list sweeps the "
                             "concurrency, one case per size (default 32)")
    parser.add_argument("--input-len", type=int, default=256, help="prompt window in tokens (default 256)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per engine and case (default 2)")
    parser.add_argument("--warmup", choices=("full", "short"), default="full",
                        help="before each case, every engine runs it once (full: the adaptive planner has "
                             "learned the load when measured) or two of its prompts (short)")
    parser.add_argument("--output-json", default=None,
                        help="result file (default: benchmarks/results/spec-<model>-<UTC time>.json)")
    EngineArgs.add_cli_args(parser, model=None)
    parser.set_defaults(speculative_config=DEFAULT_SPEC)
    return parser


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 32 or 4,8,16,32, got {text!r}") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 2 (batch 1 always runs, one request at a time), "
                                         f"got {text!r}")
    return sorted(set(sizes))


def make_prompts(token_ids: list[int], count: int, input_len: int, workload: str) -> list[list[int]]:
    """``count`` windows spread over ``token_ids``; copy: each followed by a restart of itself."""
    span = max(1, len(token_ids) - input_len)
    prompts = []
    for i in range(count):
        start = (i * span) // max(1, count)
        window = token_ids[start:start + input_len]
        prompts.append(window if workload == "code" else window + window[: len(window) // 4])
    return prompts


def _run(llm, prompts: list[list[int]], params, one_at_a_time: bool) -> tuple[float, list[list[int]], list[int]]:
    """(seconds, outputs, [drafts, accepted] counted in this run)."""
    planner = llm.llm_engine.scheduler.planner
    before = (planner.stats.num_drafts, planner.stats.num_accepted_tokens) if planner is not None else (0, 0)
    start = time.perf_counter()
    if one_at_a_time:
        outs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = (planner.stats.num_drafts, planner.stats.num_accepted_tokens) if planner is not None else (0, 0)
    return seconds, [list(o.outputs[0].token_ids) for o in outs], [after[0] - before[0], after[1] - before[1]]


def run_spec(args: argparse.Namespace) -> dict[str, Any]:
    from tandem import LLM, SamplingParams

    model = resolve_bench_model(args)
    base = bench_engine_args(args, model)
    spec = base.speculative_config or DEFAULT_SPEC
    variants = {"off": None, "fixed": {**spec, "adaptive": False}, "adaptive": {**spec, "adaptive": True}}
    engines = {name: LLM(**{**vars(base), "speculative_config": cfg}) for name, cfg in variants.items()}
    tokenizer = engines["off"].llm_engine.tokenizer
    token_ids = tokenizer.encode(Path(args.text).read_text())
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    cases = {}
    for workload in ("code", "copy"):
        batched = [(f"batch{n}", n, False) for n in args.batch_size]
        for label, count, alone in [("batch1", args.num_prompts, True), *batched]:
            prompts = make_prompts(token_ids, count, args.input_len, workload)
            for llm in engines.values():  # warm-up: the planner learns this load here (one full round)
                _run(llm, prompts if args.warmup == "full" else prompts[:2], params, alone)
            cases[f"{workload}-{label}"] = _measure(engines, prompts, params, alone, args.rounds)
    llm = engines["off"]
    runner = llm.llm_engine.runner
    results = {
        **results_header("spec_decode", model, runner),
        "workload": {"text": str(Path(args.text).resolve()), "text_tokens": len(token_ids),
                     "num_prompts_batch1": args.num_prompts, "batch_size": args.batch_size, "input_len": args.input_len,
                     "output_len": args.output_len, "rounds": args.rounds, "warmup": args.warmup,
                     "sampling": {"temperature": 0.0, "ignore_eos": True}},
        "flags": {**engine_flags(base), "speculative_variants": variants},
        "cases": cases,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.output_json) if args.output_json else default_output_json(model, kind="spec")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=4) + "\n")
    for name, case in cases.items():
        print(f"{name:>14}: off {case['off']['output_tok_s']:7.1f} tok/s | fixed {case['fixed']['output_tok_s']:7.1f} "
              f"({case['fixed']['speedup']:.2f}x, accept len {case['fixed']['acceptance_length']:.2f}) | adaptive "
              f"{case['adaptive']['output_tok_s']:7.1f} ({case['adaptive']['speedup']:.2f}x, accept len "
              f"{case['adaptive']['acceptance_length']:.2f}) | same outputs {case['same_outputs']}")
    print(f"Results written to {out}")
    return {**results, "output_json": str(out)}


def _measure(engines: dict[str, Any], prompts: list[list[int]], params, alone: bool, rounds: int) -> dict[str, Any]:
    seconds = dict.fromkeys(engines, 0.0)
    counts = {name: [0, 0] for name in engines}
    outputs: dict[str, list[list[int]]] = {}
    names = list(engines)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            s, outs, (drafts, accepted) = _run(engines[name], prompts, params, alone)
            seconds[name] += s
            counts[name][0] += drafts
            counts[name][1] += accepted
            outputs[name] = outs
    tokens = rounds * sum(len(o) for o in outputs["off"])
    case: dict[str, Any] = {"same_outputs": all(o == outputs["off"] for o in outputs.values())}
    for name in engines:
        drafts, accepted = counts[name]
        case[name] = {"seconds": seconds[name], "output_tok_s": tokens / seconds[name],
                      "speedup": seconds["off"] / seconds[name], "verified_steps_with_drafts": drafts,
                      "acceptance_length": 1 + accepted / drafts if drafts else 0.0}
    return case
