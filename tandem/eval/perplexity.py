"""``tandem eval perplexity MODEL FILE...``: per-token perplexity from the engine's prompt logprobs.

Each file is tokenized as a prompt (with the tokenizer's special tokens, e.g. BOS) and cut into
non-overlapping windows of ``window`` tokens; every token of a window but its first is scored
given the tokens before it in that window. Perplexity = exp(total NLL / tokens scored).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.engine.arg_utils import EngineArgs
from tandem.sampling_params import SamplingParams


@dataclass
class PerplexityResult:
    name: str
    tokens_scored: int
    nll: float  # summed over the scored tokens, in nats

    @property
    def perplexity(self) -> float:
        if not self.tokens_scored:
            raise ValueError(f"{self.name}: no token to score (empty text or shorter than two tokens)")
        return math.exp(self.nll / self.tokens_scored)


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows; a trailing window of one token has nothing to score and is dropped."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    return [token_ids[i:i + window] for i in range(0, len(token_ids), window) if len(token_ids[i:i + window]) >= 2]


def score_texts(llm, texts: dict[str, str], window: int) -> list[PerplexityResult]:
    """One result per text, in order; all windows of all texts go to the engine as one batch."""
    tokenizer = llm.get_tokenizer()
    limit = llm.llm_engine.max_model_len - 1  # the engine also samples one token after each window
    if window > limit:
        raise ValueError(f"window {window} exceeds the model's context ({limit + 1} tokens, one kept for "
                         "the sampled token); pass a smaller --window")
    prompts, owners = [], []
    for name, text in texts.items():
        for w in windows(tokenizer.encode(text), window):
            prompts.append({"prompt_token_ids": w})
            owners.append(name)
    results = {name: PerplexityResult(name, 0, 0.0) for name in texts}
    if not prompts:
        return list(results.values())
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for owner, prompt, out in zip(owners, prompts, llm.generate(prompts, params, use_tqdm=False)):
        res = results[owner]
        for token, entry in zip(prompt["prompt_token_ids"][1:], out.prompt_logprobs[1:]):
            res.nll -= entry[token].logprob
            res.tokens_scored += 1
    return list(results.values())


def add_perplexity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("files", nargs="+", help="text files to score")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per window (default: min(1024, context - 1))")
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser, model=None)


def run_perplexity(args: argparse.Namespace) -> dict:
    from tandem import LLM

    texts = {}
    for f in args.files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"{f}: no such file")
        texts[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    window = args.window or min(1024, llm.llm_engine.max_model_len - 1)
    results = score_texts(llm, texts, window)
    total = PerplexityResult("total", sum(r.tokens_scored for r in results), sum(r.nll for r in results))
    for r in results + ([total] if len(results) > 1 else []):
        print(f"{r.name}: perplexity {r.perplexity:.4f} over {r.tokens_scored} tokens")
    report = {"model": args.model, "window": window,
              "files": [{**asdict(r), "perplexity": r.perplexity} for r in results],
              "perplexity": total.perplexity, "tokens_scored": total.tokens_scored}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
