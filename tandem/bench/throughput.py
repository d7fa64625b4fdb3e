"""``tandem bench throughput``: offline throughput, as ``vllm bench throughput``.

Same flag names, the same random dataset and the same JSON keys as vLLM's benchmark
(``vllm/benchmarks/throughput.py``, ``vllm/benchmarks/datasets``), so the two commands
can be run side by side on one model directory and compared number for number.

The random dataset follows vLLM's ``RandomDataset.sample`` step for step, with the same
``numpy.random.default_rng(seed)`` draws in the same order:

* input lengths are integers uniform in ``[floor(L*(1-r)), ceil(L*(1+r))]`` with
  ``L = input_len - tokenizer.num_special_tokens_to_add()``; output lengths likewise in
  ``[max(1, floor(O*(1-r))), max(1, ceil(O*(1+r)))]``; then one vocabulary offset per request;
* prompt i is ``allowed[(offset_i + i + arange(len_i)) % len(allowed)]`` where ``allowed`` is
  the vocabulary minus the tokenizer's special ids;
* the sequence is decoded and re-encoded (and topped up with random ids or truncated, up to
  10 times) until it re-encodes to exactly its target length, as vLLM does before sending text.

The resulting token ids are what vLLM's engine sees after tokenizing its text prompt; tandem is
given the ids directly (``{"prompt_token_ids": ...}``), so no second round trip moves a length.

Every request uses ``SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True,
max_tokens=output_len_i)`` as vLLM's ``run_vllm`` does; only ``llm.generate`` is timed
(``time.perf_counter``), never engine construction.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.engine.arg_utils import EngineArgs
from tandem.spec_decode.planner import SpeculationPlanner

DATASETS = ("random",)
# vLLM's gen_prompt_decode_to_target_len default.
_MAX_RETOKENIZE_TRIES = 10


# --------------------------------------------------------------------------- CLI


def _range_ratio(value: str) -> float | dict[str, float]:
    """A float, or vLLM's JSON form '{"input": 0.3, "output": 0.5}'."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not a float or a JSON dict: {value!r}") from None
    if not isinstance(parsed, dict) or set(parsed) != {"input", "output"}:
        raise argparse.ArgumentTypeError('a dict range ratio needs exactly the keys "input" and "output"')
    return {k: float(v) for k, v in parsed.items()}


def add_throughput_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``vllm bench throughput`` that tandem supports (same names, same defaults); the
    engine flags (--model, --tokenizer, --seed, --max-num-seqs, ...) are EngineArgs'."""
    parser.add_argument("--model", default=None, help="Hugging Face model directory, or with --load-format dummy "
                                                      "a built-in shape (default: $TANDEM_MODEL or the bundled demo)")
    parser.add_argument("--dataset-name", choices=DATASETS, default="random",
                        help="synthetic dataset (only vLLM's 'random' for now)")
    # vLLM also has --random-input-len / --random-output-len; both spellings set the same value here.
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=1024,
                        help="mean prompt length in tokens (default 1024)")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128,
                        help="mean output length in tokens (default 128)")
    parser.add_argument("--random-range-ratio", type=_range_ratio, default=0.0,
                        help="lengths are uniform in [len*(1-r), len*(1+r)]; a float, or "
                             'a JSON dict {"input": r_in, "output": r_out}; r in [0, 1)')
    parser.add_argument("--num-prompts", type=int, default=1000, help="number of requests (default 1000)")
    parser.add_argument("--num-warmups", type=int, default=0,
                        help="untimed warm-up requests before the timed run (dataset seed + 1, as vLLM)")
    parser.add_argument("--output-json", default=None,
                        help="result file (default: benchmarks/results/throughput-<model>-<UTC time>.json)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    EngineArgs.add_cli_args(parser, model=None)
    return parser


# --------------------------------------------------------------------------- dataset


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    prompt_len: int
    expected_output_len: int


def _resolve_range_ratios(ratio: float | dict[str, float]) -> tuple[float, float]:
    if isinstance(ratio, dict):
        return float(ratio["input"]), float(ratio["output"])
    return float(ratio), float(ratio)


def spec_decode_summary(planner: SpeculationPlanner | None) -> dict[str, Any] | None:
    """Speculative decoding's counters over the run (warm-ups included); None without speculation."""
    if planner is None:
        return None
    s = planner.stats
    return {"num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens, "acceptance_length": round(s.acceptance_length, 4),
            "accepted_per_position": list(s.accepted_per_pos)}


def length_bounds(input_len: int, output_len: int, range_ratio: float | dict[str, float],
                  num_special_tokens: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """((in_low, in_high), (out_low, out_high)), inclusive, exactly as vLLM's get_sampling_params."""
    r_in, r_out = _resolve_range_ratios(range_ratio)
    if not 0.0 <= r_in < 1.0:
        raise ValueError(f"random_range_ratio: input ratio must be in [0, 1), got {r_in}")
    if not 0.0 <= r_out < 1.0:
        raise ValueError(f"random_range_ratio: output ratio must be in [0, 1), got {r_out}")
    real_input_len = max(0, int(input_len) - num_special_tokens)
    in_low, in_high = math.floor(real_input_len * (1 - r_in)), math.ceil(real_input_len * (1 + r_in))
    out_low = max(math.floor(output_len * (1 - r_out)), 1)
    out_high = max(math.ceil(output_len * (1 + r_out)), 1)
    if in_low < 1:
        raise ValueError(f"input_len {input_len} with range ratio {r_in} allows empty prompts; "
                         "raise --input-len or lower --random-range-ratio")
    return (in_low, in_high), (out_low, out_high)


def _decode_to_target_len(tokenizer, seq: list[int], target: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """vLLM's gen_prompt_decode_to_target_len: ids whose decoded text re-encodes to themselves."""
    tries = _MAX_RETOKENIZE_TRIES
    while True:
        text = tokenizer.decode(seq)
        seq = tokenizer.encode(text, add_special_tokens=False)
        if tries <= 0:
            return seq, len(seq) - target
        if len(seq) == target:
            return seq, 0
        if len(seq) < target:
            seq.extend(rng.integers(0, tokenizer.vocab_size, size=target - len(seq)).tolist())
        else:
            seq = seq[:target]
        tries -= 1


def sample_random_requests(tokenizer, num_requests: int, input_len: int, output_len: int,
                           range_ratio: float | dict[str, float] = 0.0, seed: int = 0,
                           retokenize: bool = True) -> tuple[list[BenchRequest], int]:
    """vLLM's RandomDataset.sample (prefix_len 0). Returns (requests, total token mismatch).

    retokenize=False skips the decode/re-encode fix-up (prompt lengths are then exactly the
    sampled ones, but the ids differ from what vLLM sends whenever the tokenizer merges them).
    """
    if num_requests < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    num_special = int(tokenizer.num_special_tokens_to_add())
    (in_low, in_high), (out_low, out_high) = length_bounds(input_len, output_len, range_ratio, num_special)
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num_requests)

    vocab_size = tokenizer.vocab_size
    # Same expression as vLLM so the ordering of `allowed` is the same too.
    allowed = np.array(list(set(np.arange(vocab_size)) - set(tokenizer.all_special_ids)))
    requests, mismatch = [], 0
    for i in range(num_requests):
        n = int(input_lens[i])
        ids = allowed[(int(offsets[i]) + i + np.arange(n)) % len(allowed)].tolist()
        if retokenize:
            ids, miss = _decode_to_target_len(tokenizer, ids, n, rng)
            mismatch += miss
        requests.append(BenchRequest(ids, len(ids), int(output_lens[i])))
    return requests, mismatch


# --------------------------------------------------------------------------- environment


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: Any = None) -> str:
    """'cpu: <model name>, N threads, <vector ISA torch dispatches to>' or 'cuda: <device name>'
    (the same model name covers CPUs with and without AVX-512, so the ISA is named too)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {_cpu_model_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def _safetensors_param_count(model_dir: Path) -> int | None:
    total, found = 0, False
    for path in sorted(model_dir.glob("*.safetensors")):
        found = True
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total if found else None


def model_shape(model_dir: str | Path) -> dict[str, Any]:
    """Shape fields from config.json plus the parameter count from the safetensors headers."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "hidden_size": hidden,
        "num_layers": cfg.get("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or (hidden // heads if hidden and heads else None),
        "intermediate_size": cfg.get("intermediate_size"),
        "vocab_size": cfg.get("vocab_size"),
        "tie_word_embeddings": cfg.get("tie_word_embeddings"),
        "num_params": _safetensors_param_count(model_dir),
    }


def default_output_json(model: str | Path, now: datetime | None = None, kind: str = "throughput") -> Path:
    """benchmarks/results/<kind>-<model directory name>-<UTC time>.json"""
    now = now or datetime.now(UTC)
    name = Path(model).resolve().name or "model"
    return Path("benchmarks") / "results" / f"{kind}-{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"


def results_header(benchmark: str, model: str, runner) -> dict[str, Any]:
    """The fields every tandem results file starts with: what ran, on which device, which model."""
    return {"engine": "tandem", "benchmark": benchmark, "device": describe_device(runner.device),
            "model": str(Path(model).resolve()), "model_shape": loaded_shape(model, runner),
            "dtype": str(runner.dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- run


def bench_engine_args(args: argparse.Namespace, model: str) -> EngineArgs:
    """The run's EngineArgs, with the model resolved by resolve_bench_model."""
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = model
    return engine_args


def engine_flags(engine_args: EngineArgs) -> dict[str, Any]:
    """The engine flags a results file records (the model is recorded on its own)."""
    flags = engine_args.to_dict()
    flags.pop("model")
    return flags


def resolve_bench_model(args: argparse.Namespace) -> str:
    """The model directory: --model, a built-in dummy shape (written on first use), or the default."""
    from tandem.engine.arg_utils import default_model_path
    from tandem.testing import DUMMY_CONFIGS, write_dummy_model

    model = args.model or default_model_path()
    if getattr(args, "load_format", "auto") == "dummy" and model in DUMMY_CONFIGS:
        return str(write_dummy_model(model, Path(".cache") / "dummy" / model))
    if not Path(model, "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json (pass a local Hugging Face model directory)")
    return model


def loaded_shape(model: str, runner) -> dict[str, Any]:
    """model_shape, with the parameter count of the loaded model where there are no safetensors,
    the bytes its weights take as loaded (quantized layers at their stored size) and, under a
    precision policy or a pre-quantized checkpoint, the layers per scheme."""
    from collections import Counter

    from tandem.quantization import model_weight_bytes

    shape = model_shape(model)
    if not shape.get("num_params"):
        shape["num_params"] = sum(p.numel() for p in runner.model.parameters())
    shape["weight_bytes"] = model_weight_bytes(runner.model)
    report = runner.precision
    if report is not None:
        shape["precision"] = {"source": report.source, "layers_per_scheme": dict(Counter(report.schemes().values())),
                              "weight_bytes_unquantized": report.weight_bytes_before}
    return shape


def _generate(llm, requests: list[BenchRequest], use_tqdm: bool):
    from tandem import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=r.expected_output_len)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    return time.perf_counter() - start, outputs


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Sample the dataset, build the engine, time one ``generate`` over all requests, write JSON."""
    import torch

    import tandem
    from tandem import LLM
    from tandem.tokenizer import load_tokenizer

    model = resolve_bench_model(args)
    if args.dataset_name not in DATASETS:
        raise ValueError(f"dataset_name: only {DATASETS} supported, got {args.dataset_name!r}")
    if args.num_warmups < 0:
        raise ValueError(f"num_warmups must be >= 0, got {args.num_warmups}")
    tokenizer = load_tokenizer(args.tokenizer or model)
    requests, mismatch = sample_random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len,
                                                args.random_range_ratio, args.seed)
    warmups: list[BenchRequest] = []
    if args.num_warmups:
        warmups, _ = sample_random_requests(tokenizer, args.num_warmups, args.input_len, args.output_len,
                                            args.random_range_ratio, args.seed + 1)
    if mismatch:
        print(f"warning: prompts have {mismatch:+d} tokens versus the sampled lengths after decode/re-encode "
              "(vLLM's random dataset does the same)", file=sys.stderr)

    engine_args = bench_engine_args(args, model)
    llm = LLM(**vars(engine_args))
    engine = llm.llm_engine
    longest = max(r.prompt_len + r.expected_output_len for r in requests + warmups)
    if longest > engine.max_model_len:
        raise ValueError(f"max_model_len {engine.max_model_len} < longest request ({longest} prompt + output "
                         "tokens); raise --max-model-len or lower the lengths")

    use_tqdm = not getattr(args, "disable_tqdm", False)
    if warmups:
        print(f"Warming up with {len(warmups)} requests...")
        _generate(llm, warmups, use_tqdm)
    elapsed, outputs = _generate(llm, requests, use_tqdm)

    # Counted from the outputs, as vLLM does for its own backend.
    total_prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    total_output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    total_num_tokens = total_prompt_tokens + total_output_tokens
    print(f"Throughput: {len(requests) / elapsed:.2f} requests/s, {total_num_tokens / elapsed:.2f} total tokens/s, "
          f"{total_output_tokens / elapsed:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {total_prompt_tokens}")
    print(f"Total num output tokens:  {total_output_tokens}")

    runner = engine.runner
    r_in, r_out = _resolve_range_ratios(args.random_range_ratio)
    (in_low, in_high), (out_low, out_high) = length_bounds(args.input_len, args.output_len, args.random_range_ratio,
                                                           int(tokenizer.num_special_tokens_to_add()))
    prompt_lens = [r.prompt_len for r in requests]
    output_lens = [r.expected_output_len for r in requests]
    results: dict[str, Any] = {
        # vLLM's keys (vllm/benchmarks/throughput.py, --output-json)
        "model_id": model,
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_num_tokens": total_num_tokens,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": total_num_tokens / elapsed,
        "total_token_throughput": total_num_tokens / elapsed,  # the name vllm bench serve uses
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        # vLLM prints this one but does not write it
        "output_tokens_per_second": total_output_tokens / elapsed,
        # ours
        "engine": "tandem",
        "device": describe_device(runner.device),
        "model": str(Path(model).resolve()),
        "model_shape": loaded_shape(model, runner),
        "load_format": engine_args.load_format,
        "attention_backend": runner.attention_backend,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "workload": {
            "dataset": args.dataset_name,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "random_range_ratio": args.random_range_ratio if isinstance(args.random_range_ratio, dict) else r_in,
            "input_len_range": [in_low, in_high],
            "output_len_range": [out_low, out_high],
            "num_prompts": args.num_prompts,
            "num_warmups": args.num_warmups,
            "seed": args.seed,
            "total_prompt_tokens": total_prompt_tokens,
            "total_output_tokens": total_output_tokens,
            "requested_output_tokens": sum(output_lens),
            "prompt_len_min_max": [min(prompt_lens), max(prompt_lens)],
            "output_len_min_max": [min(output_lens), max(output_lens)],
            "retokenize_mismatch": mismatch,
            "sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "ignore_eos": True},
        },
        "flags": {
            **engine_flags(engine_args),
            "resolved": {
                "max_model_len": engine.max_model_len,
                "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
                "num_kv_blocks": runner.num_blocks,
                "kv_cache_bytes": runner.num_blocks * runner.kv_bytes_per_block,
            },
        },
        "spec_decode": spec_decode_summary(engine.scheduler.planner),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "tandem_version": tandem.__version__,
        "python_version": platform.python_version(),
        "command": " ".join(["tandem", "bench", "throughput"] + sys.argv[3:]) if _invoked_as_cli() else None,
    }
    out = Path(args.output_json) if args.output_json else default_output_json(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=4) + "\n")
    results["output_json"] = str(out)
    print(f"Results written to {out}")
    return results


def _invoked_as_cli() -> bool:
    return len(sys.argv) >= 3 and sys.argv[1:3] == ["bench", "throughput"] and \
        os.path.basename(sys.argv[0]) in ("tandem", "cli.py", "__main__.py", "-m")
