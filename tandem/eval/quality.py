"""``tandem eval quality MODEL [--quantization S | --precision-policy F | --kv-cache-dtype D]``:
what a precision choice costs in quality, measured against the same model unquantized.

Both engines score the same token windows of a text set (default: the model directory's
``heldout-sample.txt``, the demo model's held-out code) through the engine's real kernels
(``EngineCore.score_logits``: one paged prefill, whole next-token distributions). Reported:

* ``ppl_ratio``: perplexity of the candidate over the reference's (1.0 = no loss);
* ``mean_kl``: mean KL(reference || candidate) of the next-token distributions, in nats;
* ``top1_agreement``: share of positions where both put the same token first;
* ``greedy_agreement``: greedy continuations of window prefixes, the mean share of each
  continuation produced before the first token where the two differ (1.0 = identical).

``--reference DIR`` compares against another model with the same tokenizer (the float original of a
pre-quantized checkpoint). Each engine gets a 1 GiB KV cache unless ``--kv-cache-memory`` says
otherwise (scoring needs little, and two engines share the device).

The command exits 1 when ``ppl_ratio`` exceeds ``--max-ppl-ratio`` or ``mean_kl`` exceeds
``--max-kl``, so CI can hold every scheme and shipped policy to a quality bar.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from tandem.engine.arg_utils import EngineArgs
from tandem.sampling_params import SamplingParams

SCORING_KV_CACHE = "1GiB"  # each engine's KV cache unless --kv-cache-memory is given
# the engine arguments that choose a precision: the candidate takes them, the reference does not
PRECISION_ARGS = {"quantization": None, "precision_policy": None, "kv_cache_dtype": "auto", "dtype": "auto"}


@dataclass
class QualityReport:
    ppl_reference: float
    ppl_candidate: float
    mean_kl: float
    top1_agreement: float
    greedy_agreement: float
    tokens_scored: int
    continuations: int

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_candidate / self.ppl_reference

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


@dataclass
class _Totals:
    nll_ref: float = 0.0
    nll_cand: float = 0.0
    kl: float = 0.0
    top1_same: int = 0
    scored: int = 0

    def add(self, ids: list[int], ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> None:
        """Positions 0..n-2 predict tokens 1..n-1."""
        ref = torch.log_softmax(ref_logits[:-1].float(), dim=-1)
        cand = torch.log_softmax(cand_logits[:-1].float(), dim=-1)
        targets = torch.tensor(ids[1:])[:, None]
        self.nll_ref -= ref.gather(1, targets).sum().item()
        self.nll_cand -= cand.gather(1, targets).sum().item()
        self.kl += (ref.exp() * (ref - cand)).sum().item()
        self.top1_same += int((ref.argmax(-1) == cand.argmax(-1)).sum().item())
        self.scored += len(ids) - 1


def windows(token_ids: list[int], window: int, max_windows: int | None) -> list[list[int]]:
    out = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    out = [w for w in out if len(w) >= 2]
    return out[:max_windows] if max_windows else out


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer sequence produced before the first position where the two differ."""
    longest = max(len(a), len(b))
    if not longest:
        return 1.0
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / longest


def compare(reference: Any, candidate: Any, token_windows: list[list[int]], prompt_len: int,
            continuation_len: int) -> QualityReport:
    """reference, candidate: ``LLM`` objects over the same tokenizer."""
    totals = _Totals()
    for ids in token_windows:
        totals.add(ids, reference.llm_engine.core.score_logits(ids), candidate.llm_engine.core.score_logits(ids))
    prompts = ([{"prompt_token_ids": w[:prompt_len]} for w in token_windows if len(w) > prompt_len]
               if continuation_len > 0 else [])
    params = SamplingParams(max_tokens=max(1, continuation_len), temperature=0.0, ignore_eos=True)
    ref_out = reference.generate(prompts, params, use_tqdm=False) if prompts else []
    cand_out = candidate.generate(prompts, params, use_tqdm=False) if prompts else []
    agreements = [agreement(list(r.outputs[0].token_ids), list(c.outputs[0].token_ids))
                  for r, c in zip(ref_out, cand_out)]
    if not totals.scored:
        raise ValueError("no token to score: the text set is empty or shorter than two tokens")
    return QualityReport(
        ppl_reference=math.exp(totals.nll_ref / totals.scored),
        ppl_candidate=math.exp(totals.nll_cand / totals.scored),
        mean_kl=totals.kl / totals.scored,
        top1_agreement=totals.top1_same / totals.scored,
        greedy_agreement=sum(agreements) / len(agreements) if agreements else 1.0,
        tokens_scored=totals.scored,
        continuations=len(agreements),
    )


def add_quality_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face model directory (default: $TANDEM_MODEL or the bundled demo model)")
    parser.add_argument("--reference", default=None,
                        help="the model to compare against (default: MODEL itself without the precision flags); "
                             "for a pre-quantized checkpoint, the float model it was made from")
    parser.add_argument("--text", nargs="+", default=None,
                        help="text files to score (default: the model directory's heldout-sample.txt)")
    parser.add_argument("--window", type=int, default=256, help="tokens per scored window")
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="tokens of each window used as a greedy-continuation prompt")
    parser.add_argument("--continuation-len", type=int, default=32,
                        help="greedy tokens generated per prompt (0: no greedy comparison)")
    parser.add_argument("--max-ppl-ratio", type=float, default=1.03,
                        help="fail (exit 1) when perplexity rises past this ratio of the reference's")
    parser.add_argument("--max-kl", type=float, default=None,
                        help="fail (exit 1) when the mean KL divergence exceeds this (nats)")
    parser.add_argument("--show-policy", action="store_true",
                        help="print every linear layer's resolved precision and exit")
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser, model=None)


def _texts(args: argparse.Namespace, model_dir: str) -> str:
    files = [Path(f) for f in args.text] if args.text else [Path(model_dir) / "heldout-sample.txt"]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file" + ("" if args.text else " (pass --text FILE)"))
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def run_quality(args: argparse.Namespace) -> int:
    from tandem import LLM
    from tandem.bench.throughput import describe_device

    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.kv_cache_memory is None:  # two engines share the device: neither may size by free memory
        engine_args.kv_cache_memory = SCORING_KV_CACHE
    candidate = LLM(**vars(engine_args))
    runner = candidate.llm_engine.runner
    if args.show_policy:
        print(runner.precision.table() if runner.precision else "no precision policy: every layer in the "
              f"model's dtype ({str(runner.dtype).removeprefix('torch.')})")
        return 0
    if args.window < 2 or args.window > candidate.llm_engine.max_model_len:
        raise ValueError(f"--window must be in [2, {candidate.llm_engine.max_model_len}], got {args.window}")
    reference_args = vars(engine_args) | PRECISION_ARGS | ({"model": args.reference} if args.reference else {})
    if reference_args == vars(engine_args):
        raise ValueError("nothing to compare: the candidate is the reference. Give --quantization, "
                         "--precision-policy, --kv-cache-dtype or --dtype, or --reference MODEL (e.g. the "
                         "float model a pre-quantized checkpoint was made from)")
    reference = LLM(**reference_args)
    model_dir = candidate.llm_engine.runner.model_config.model
    token_ids = candidate.get_tokenizer().encode(_texts(args, model_dir), verbose=False)  # scored in windows
    started = time.perf_counter()
    report = compare(reference, candidate, windows(token_ids, args.window, args.max_windows), args.prompt_len,
                     args.continuation_len)
    failures = _failures(report, args.max_ppl_ratio, args.max_kl)
    _print(report, failures)
    if args.output_json:
        record = {"model": model_dir, "reference": reference.llm_engine.runner.model_config.model,
                  "engine_args": engine_args.to_dict(), "window": args.window,
                  "elapsed_s": time.perf_counter() - started, **report.to_dict(),
                  "device": describe_device(candidate.llm_engine.runner.device),
                  "date": datetime.now(UTC).isoformat(timespec="seconds"),
                  "thresholds": {"max_ppl_ratio": args.max_ppl_ratio, "max_kl": args.max_kl},
                  "passed": not failures, "policy": runner.precision.to_dict() if runner.precision else None}
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    return 1 if failures else 0


def _failures(report: QualityReport, max_ppl_ratio: float | None, max_kl: float | None) -> list[str]:
    failures = []
    if max_ppl_ratio is not None and report.ppl_ratio > max_ppl_ratio:
        failures.append(f"perplexity ratio {report.ppl_ratio:.4f} > {max_ppl_ratio}")
    if max_kl is not None and report.mean_kl > max_kl:
        failures.append(f"mean KL {report.mean_kl:.5f} > {max_kl}")
    return failures


def _print(report: QualityReport, failures: list[str]) -> None:
    rows = [("perplexity (reference)", f"{report.ppl_reference:.4f}"),
            ("perplexity (candidate)", f"{report.ppl_candidate:.4f}"),
            ("perplexity ratio", f"{report.ppl_ratio:.4f}"),
            ("mean KL (nats)", f"{report.mean_kl:.5f}"),
            ("top-1 agreement", f"{report.top1_agreement:.4f}"),
            ("greedy agreement", f"{report.greedy_agreement:.4f} over {report.continuations} continuations"),
            ("tokens scored", str(report.tokens_scored))]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    print("FAILED: " + "; ".join(failures) if failures else "passed")
