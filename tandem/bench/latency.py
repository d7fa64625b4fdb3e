"""``tandem bench latency``: offline latency of one batch, as ``vllm bench latency``.

Same flag names and defaults as vLLM's benchmark where both have the flag, and vLLM's JSON keys
(``avg_latency``, ``latencies``, ``percentiles``) plus our own. The engine is built once; each
iteration submits ``batch_size`` prompts of exactly ``input_len`` random token ids (drawn with
``numpy.random.default_rng(seed)`` from the vocabulary minus the special ids) with
``SamplingParams(n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)`` and
steps the engine until every request has finished.

Definitions (all times from ``time.perf_counter``):

* latency: one whole batch end to end, from the first ``add_request`` to the last ``step()``;
  ``num_iters_warmup`` untimed batches run first;
* step kinds: a step is a *prefill* step when it advanced the prompt of at least one request
  (including a recompute after preemption), else a *decode* step (every scheduled request
  generated one token after its prompt was done);
* ``median_prefill_s``: per iteration, the time from the batch start to the end of its last
  prefill step (all prompts computed), median over the timed iterations;
* ``median_decode_step_ms``: median duration of all decode steps of all timed iterations;
* ``model_weight_bytes``: the loaded weights' bytes (quantized layers at their stored size)
  (the embeddings included);
* ``achieved_weight_bandwidth_gbps``: ``model_weight_bytes / median decode step (s) / 1e9``,
  since a decode step reads every weight once (KV cache reads are not counted);
* ``decode_bandwidth_fraction``: ``decode_bytes_per_step / median decode step / copy bandwidth``,
  with the weights plus every sequence's KV at its mean decode context (``input_len +
  output_len / 2``) as the bytes a step reads, and the copy bandwidth measured on the device in the
  same run (``copy_bandwidth_gbps``: read + write of a large tensor copy);
* ``decode_roofline_fraction``: the step's roofline bound over its median time, the bound being
  the larger of its bytes over the copy bandwidth and its FLOPs (``decode_flops_per_step()``: every
  linear weight and the LM head once per sequence, attention over the mean decode context) over
  the matmul throughput; ``decode_bound`` says which one binds (a batched fp32 decode on a CPU is
  usually compute-bound, so the bandwidth fraction alone understates it);
* ``decode_phase_fraction``: the same against ``decode_phase_bound_ms``, the linear layers (weight
  bytes, linear FLOPs) and the attention (KV bytes, attention FLOPs) each at its own bound, one
  after the other (``phase_bound_s()``): attention cannot hide its KV reads under the matmuls;
* ``prefill_flops_fraction``: ``prefill_flops / median_prefill_compute_s / matmul throughput``,
  with ``prefill_flops`` from the model's shape (``prefill_flops()``: linear weights per prompt
  token, the LM head per prompt, causal attention), ``median_prefill_compute_s`` the median over
  iterations of the summed prefill step times, and the throughput of a square matmul in the
  model's dtype measured on the device in the same run (``matmul_gflops``).

Prefix caching is off by default (``--enable-prefix-caching`` turns it on): with it, every
iteration after the first would find the same prompts in the cache and skip their prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tandem.bench.throughput import (
    bench_engine_args,
    default_output_json,
    describe_device,
    engine_flags,
    loaded_shape,
    resolve_bench_model,
)
from tandem.engine.arg_utils import EngineArgs

PERCENTILES = (10, 25, 50, 75, 90, 99)


# --------------------------------------------------------------------------- CLI


def add_latency_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``vllm bench latency`` that tandem supports, plus EngineArgs' engine flags (prefix
    caching off by default here)."""
    parser.add_argument("--model", default=None, help="Hugging Face model directory, or with --load-format dummy "
                                                      "a built-in shape (default: $TANDEM_MODEL or the bundled demo)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--output-len", type=int, default=128, help="output length in tokens (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--num-iters-warmup", type=int, default=10, help="untimed batches first (default 10)")
    parser.add_argument("--num-iters", type=int, default=30, help="timed batches (default 30)")
    parser.add_argument("--output-json", default=None,
                        help="result file (default: benchmarks/results/latency-<model>-<UTC time>.json)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed batches, run one under torch.profiler and add where a prefill and a "
                             "decode step spend their time (by phase and op kind) to the results")
    EngineArgs.add_cli_args(parser, model=None)
    # NOTE: the one engine default that differs here: every iteration sends the same prompts, so with
    # prefix caching on, all iterations after the first would skip their prefill
    parser.set_defaults(enable_prefix_caching=False)
    return parser


def validate_latency_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for any workload flag out of range."""
    minimums = {"batch_size": 1, "input_len": 1, "output_len": 1, "n": 1, "num_iters": 1, "num_iters_warmup": 0}
    for name, low in minimums.items():
        value = getattr(args, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")



# --------------------------------------------------------------------------- workload


def random_prompts(tokenizer, vocab_size: int, batch_size: int, input_len: int, seed: int) -> list[list[int]]:
    """``batch_size`` prompts of exactly ``input_len`` ids, uniform over non-special ids < vocab_size."""
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.choice(allowed, size=(batch_size, input_len)).tolist()


@dataclass
class BatchTiming:
    latency_s: float
    prefill_s: float  # batch start -> end of the last step that advanced a prompt
    decode_steps_s: list[float] = field(default_factory=list)
    prefill_steps_s: list[float] = field(default_factory=list)


def _timed_step(engine) -> tuple[float, bool]:
    """One engine step: (seconds, whether it advanced any request's prompt)."""
    prompts_left = [(r, r.num_computed_tokens) for r in engine.scheduler.requests.values()
                    if r.num_computed_tokens < r.num_prompt_tokens]
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    return elapsed, any(r.num_computed_tokens > before for r, before in prompts_left)


def run_batch(engine, prompts: list[list[int]], params, tag: str) -> BatchTiming:
    """Submit every prompt, step to completion; time the batch and each step."""
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    timing = BatchTiming(0.0, 0.0)
    while engine.has_unfinished_requests():
        elapsed, prefill = _timed_step(engine)
        if prefill:
            timing.prefill_steps_s.append(elapsed)
            timing.prefill_s = time.perf_counter() - start
        else:
            timing.decode_steps_s.append(elapsed)
    timing.latency_s = time.perf_counter() - start
    return timing


# --------------------------------------------------------------------------- run


def _build_llm(args: argparse.Namespace):
    from tandem import LLM

    model = resolve_bench_model(args)
    llm = LLM(**vars(bench_engine_args(args, model)))
    needed = args.input_len + args.output_len
    if needed > llm.llm_engine.max_model_len:
        raise ValueError(f"max_model_len {llm.llm_engine.max_model_len} < input_len + output_len ({needed}); "
                         "raise --max-model-len or lower the lengths")
    return model, llm


def _workload(args: argparse.Namespace, llm) -> tuple[list[list[int]], Any]:
    """The batch's prompts and sampling parameters."""
    from tandem import SamplingParams

    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    tokenizer = llm.get_tokenizer()
    vocab = min(len(tokenizer), llm.llm_engine.vocab_size)
    return random_prompts(tokenizer, vocab, args.batch_size, args.input_len, args.seed), params


def _profile(args: argparse.Namespace, llm) -> dict[str, Any]:
    """One more batch under torch.profiler: time per step by phase and op kind (tandem/bench/profile.py)."""
    from tandem.bench.profile import profile_batch

    engine = llm.llm_engine
    prompts, params = _workload(args, llm)

    def submit() -> None:
        for i, ids in enumerate(prompts):
            engine.add_request(f"profile-{i}", {"prompt_token_ids": ids}, params)

    report = profile_batch(engine, engine.runner.model, submit)
    engine.assert_idle()
    return report


def _measure(args: argparse.Namespace, llm) -> list[BatchTiming]:
    engine = llm.llm_engine
    prompts, params = _workload(args, llm)
    quiet = getattr(args, "disable_tqdm", False)
    for i in tqdm(range(args.num_iters_warmup), desc="Warmup iterations", disable=quiet):
        run_batch(engine, prompts, params, f"warmup{i}")
    timings = [run_batch(engine, prompts, params, f"iter{i}")
               for i in tqdm(range(args.num_iters), desc="Profiling iterations", disable=quiet)]
    engine.assert_idle()
    if engine.scheduler.num_preemptions:
        print(f"warning: {engine.scheduler.num_preemptions} preemptions (KV cache too small for "
              f"{args.batch_size * args.n} sequences of {args.input_len + args.output_len} tokens); "
              "raise --kv-cache-memory", file=sys.stderr)
    return timings


def measure_copy_bandwidth(device, nbytes: int | None = None, iters: int = 5) -> float:
    """Device memory copy bandwidth in bytes/s, counting the read and the write of every byte
    (the memory roofline a decode step is held against)."""
    import torch

    device = torch.device(device)
    nbytes = nbytes or (2 * 2**30 if device.type == "cuda" else 256 * 2**20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync()
    return 2 * nbytes * iters / (time.perf_counter() - start)


def measure_matmul_flops(device, dtype, n: int | None = None, iters: int = 20) -> float:
    """Matmul throughput in FLOP/s of a square ``n`` x ``n`` product in ``dtype`` on the device
    (the compute roofline a prefill is held against): the best of ``iters`` runs, so a busy
    machine lowers the bound less than a mean would."""
    import torch

    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def prefill_flops(shape: dict[str, Any], num_seqs: int, input_len: int) -> float:
    """FLOPs of prefilling ``num_seqs`` prompts of ``input_len`` tokens: every linear weight once per
    token (the input embedding is a lookup; the LM head runs on each prompt's last token only) plus
    causal attention (QK and PV over ``input_len * (input_len + 1) / 2`` pairs per head and layer)."""
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    embeddings = vocab * hidden * (1 if shape.get("tie_word_embeddings") else 2)
    linear = 2 * (shape["num_params"] - embeddings) * num_seqs * input_len + 2 * vocab * hidden * num_seqs
    pairs = input_len * (input_len + 1) / 2
    attention = 4 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"] * pairs * num_seqs
    return float(linear + attention)


def decode_flops_parts(shape: dict[str, Any], num_seqs: int, input_len: int, output_len: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decode step of ``num_seqs`` sequences at their mean decode
    context: every linear weight and the LM head once per sequence; QK and PV over the context per
    head and layer."""
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    input_embedding = vocab * hidden
    linear = 2 * (shape["num_params"] - input_embedding) * num_seqs
    context = input_len + output_len // 2
    attention = 4 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"] * context * num_seqs
    return float(linear), float(attention)


def decode_flops_per_step(shape: dict[str, Any], num_seqs: int, input_len: int, output_len: int) -> float:
    return sum(decode_flops_parts(shape, num_seqs, input_len, output_len))


def phase_bound_s(phases: list[tuple[float, float]], bandwidth: float, matmul_flops: float) -> float:
    """The time a step of phases (bytes, FLOPs) run one after another cannot beat: each phase at
    the larger of its bytes over the bandwidth and its FLOPs over the matmul throughput. Tighter
    than one bound over the whole step, which lets a memory-bound phase hide under a compute-bound
    one."""
    return sum(max(nbytes / bandwidth, flops / matmul_flops) for nbytes, flops in phases)


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_token: int, num_seqs: int, input_len: int,
                          output_len: int) -> int:
    """Every weight once, plus every sequence's KV at its mean decode context."""
    return weight_bytes + num_seqs * kv_bytes_per_token * (input_len + output_len // 2)


def summarize(timings: list[BatchTiming], weight_bytes: int, step_bytes: int | None = None,
              copy_bandwidth: float | None = None, flops: float | None = None,
              matmul_flops: float | None = None, step_flops: float | None = None,
              step_phases: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """vLLM's avg_latency / latencies / percentiles, plus step times, weight bandwidth, the
    fraction of the copy bandwidth a decode step achieves, its fraction of the roofline bound
    (``step_flops``: a decode step's FLOPs), its fraction of the phase bound (``step_phases``: the
    step's (bytes, FLOPs) per phase, ``phase_bound_s``) and the fraction of the matmul throughput
    the prefill steps achieve (``flops``: the batch's prefill FLOPs)."""
    latencies = [t.latency_s for t in timings]
    prefill_compute_s = statistics.median(sum(t.prefill_steps_s) for t in timings)
    flops_fraction = flops / prefill_compute_s / matmul_flops if flops and matmul_flops and prefill_compute_s else None
    decode_steps = [s for t in timings for s in t.decode_steps_s]
    decode_s = statistics.median(decode_steps) if decode_steps else None
    fraction = step_bytes / decode_s / copy_bandwidth if decode_s and step_bytes and copy_bandwidth else None
    bounds = {"memory": step_bytes / copy_bandwidth if step_bytes and copy_bandwidth else 0.0,
              "compute": step_flops / matmul_flops if step_flops and matmul_flops else 0.0}
    binding = max(bounds, key=lambda k: bounds[k])
    roofline = bounds[binding] / decode_s if decode_s and bounds[binding] else None
    phased = (phase_bound_s(step_phases, copy_bandwidth, matmul_flops)
              if step_phases and copy_bandwidth and matmul_flops and decode_s else None)
    return {
        "avg_latency": float(np.mean(latencies)),
        "latencies": latencies,
        "percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, np.percentile(latencies, PERCENTILES))},
        "median_decode_step_ms": decode_s * 1e3 if decode_s is not None else None,
        "median_prefill_s": statistics.median(t.prefill_s for t in timings),
        "num_decode_steps": len(decode_steps),
        "num_prefill_steps": sum(len(t.prefill_steps_s) for t in timings),
        "model_weight_bytes": weight_bytes,
        "achieved_weight_bandwidth_gbps": weight_bytes / decode_s / 1e9 if decode_s else None,
        "decode_bytes_per_step": step_bytes,
        "copy_bandwidth_gbps": copy_bandwidth / 1e9 if copy_bandwidth else None,
        "decode_bandwidth_fraction": fraction,
        "decode_flops_per_step": step_flops,
        "decode_roofline_bound_ms": bounds[binding] * 1e3 if roofline else None,
        "decode_bound": binding if roofline else None,
        "decode_roofline_fraction": roofline,
        "decode_phase_bound_ms": phased * 1e3 if phased else None,
        "decode_phase_fraction": phased / decode_s if phased and decode_s else None,
        "median_prefill_compute_s": prefill_compute_s,
        "prefill_flops": flops,
        "matmul_gflops": matmul_flops / 1e9 if matmul_flops else None,
        "prefill_flops_fraction": flops_fraction,
    }


def _print_summary(res: dict[str, Any]) -> None:
    pct = res["percentiles"]
    print(f"Avg latency: {res['avg_latency']:.4f} s (p50 {pct['50']:.4f} s, p99 {pct['99']:.4f} s)")
    print(f"Median prefill: {res['median_prefill_s'] * 1e3:.2f} ms")
    if res["median_decode_step_ms"] is not None:
        print(f"Median decode step: {res['median_decode_step_ms']:.3f} ms, weights read at "
              f"{res['achieved_weight_bandwidth_gbps']:.2f} GB/s; {res['decode_bandwidth_fraction']:.1%} of the "
              f"measured copy bandwidth ({res['copy_bandwidth_gbps']:.1f} GB/s)")
    if res.get("decode_roofline_fraction") is not None:
        print(f"Decode roofline: {res['decode_bound']}-bound, {res['decode_roofline_bound_ms']:.2f} ms per step; "
              f"the median step is at {res['decode_roofline_fraction']:.1%} of it")
    if res.get("decode_phase_fraction") is not None:
        print(f"Decode phase bound (linear layers, then attention over the KV cache, each at its own "
              f"bound): {res['decode_phase_bound_ms']:.2f} ms; the median step is at {res['decode_phase_fraction']:.1%} of it")
    if res.get("prefill_flops_fraction") is not None:
        print(f"Prefill steps: {res['median_prefill_compute_s'] * 1e3:.2f} ms for {res['prefill_flops'] / 1e9:.2f} "
              f"GFLOP; {res['prefill_flops_fraction']:.1%} of the measured matmul throughput "
              f"({res['matmul_gflops']:.1f} GFLOP/s)")
    for kind, part in (res.get("profile") or {}).items():
        shares = ", ".join(f"{cat} {share:.0%}" for cat, share in part["share"].items() if share >= 0.005)
        print(f"Profile, {kind} steps ({part['steps']}): {shares}")


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine once, run warm-up then timed batches, write and return the results JSON."""
    validate_latency_args(args)
    model, llm = _build_llm(args)
    runner = llm.llm_engine.runner
    shape = loaded_shape(model, runner)
    weight_bytes = int(shape["weight_bytes"])
    step_bytes = decode_bytes_per_step(weight_bytes, runner.kv_bytes_per_block // runner.block_size,
                                       args.batch_size * args.n, args.input_len, args.output_len)
    timings = _measure(args, llm)
    num_seqs = args.batch_size * args.n
    try:
        flops: float | None = prefill_flops(shape, num_seqs, args.input_len)
        linear_flops, attention_flops = decode_flops_parts(shape, num_seqs, args.input_len, args.output_len)
        step_flops: float | None = linear_flops + attention_flops
        phases: list[tuple[float, float]] | None = [(weight_bytes, linear_flops),
                                                    (step_bytes - weight_bytes, attention_flops)]
    except (KeyError, TypeError):  # a shape without the fields the counts need
        flops = step_flops = phases = None
    results = summarize(timings, weight_bytes, step_bytes, measure_copy_bandwidth(runner.device), flops,
                        measure_matmul_flops(runner.device, runner.dtype), step_flops, phases)
    if args.profile:
        results["profile"] = _profile(args, llm)
    results.update({
        "engine": "tandem",
        "device": describe_device(runner.device),
        "model": str(Path(model).resolve()),
        "model_shape": shape,
        "load_format": args.load_format,
        "attention_backend": runner.attention_backend,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch_size": args.batch_size,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "workload": {"batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
                     "n": args.n, "iters": args.num_iters, "warmup_iters": args.num_iters_warmup,
                     "seed": args.seed, "sampling": {"temperature": 1.0, "top_p": 1.0, "ignore_eos": True}},
        "flags": {**engine_flags(llm.engine_args), "resolved": {
            "max_model_len": llm.llm_engine.max_model_len,
            "max_num_batched_tokens": llm.llm_engine.config.scheduler.max_num_batched_tokens,
            "num_kv_blocks": runner.num_blocks}},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    out = Path(args.output_json) if args.output_json else default_output_json(model, kind="latency")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=4) + "\n")
    _print_summary(results)
    print(f"Results written to {out}")
    return {**results, "output_json": str(out)}
