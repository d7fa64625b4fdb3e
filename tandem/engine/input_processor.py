"""InputProcessor: prompt -> EngineCoreRequests. Tokenizes, validates once, fans n > 1 out.

The one place that decides whether a request fits (token ids, context length, logprob counts,
logit bias) and how many tokens it may generate (``max_tokens``); the server asks it too, before
it builds its SamplingParams, so the checks and the arithmetic are not repeated elsewhere.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from tandem.engine.protocol import EngineCoreRequest
from tandem.sampling_params import ParamError, SamplingParams

PromptType = str | dict


@dataclass
class ProcessedRequest:
    """One accepted prompt: what the OutputProcessor tracks, and what the core is sent."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # the parent's (n as asked); each child's are in its EngineCoreRequest
    arrival_time: float
    children: list[EngineCoreRequest]  # n of them; one (with the parent's id) when n == 1


class InputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int] | list[int], vocab_size: int,
                 max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._ids = itertools.count()

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None,
                remote_ticket=None, do_remote_decode: bool | str = False) -> ProcessedRequest:
        """Raises ParamError (naming the parameter) for a request that cannot run."""
        params = (params or SamplingParams()).clone()
        text, token_ids = self._tokenize(prompt)
        self.validate(token_ids, params)
        params._eos_token_ids = set(self.eos_token_ids)
        max_tokens = self.max_tokens(len(token_ids), params.max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = [
            EngineCoreRequest(
                request_id if params.n == 1 else f"{i}_{request_id}", token_ids,
                params if params.n == 1 else _child_params(params, i), max_tokens, arrival,
                priority=priority, cache_salt=cache_salt, parent_id=request_id if params.n > 1 else None,
                remote_ticket=remote_ticket, do_remote_decode=do_remote_decode)
            for i in range(params.n)
        ]
        return ProcessedRequest(request_id, text, token_ids, params, arrival, children)

    # -- the checks and the arithmetic, each in one place ----------------------------------------
    def room(self, prompt_len: int) -> int:
        """Tokens a prompt of this length leaves to generate (< 1: it does not fit)."""
        return self.max_model_len - prompt_len

    def max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """Tokens a request may generate: what it asked for, at most what the context leaves."""
        room = self.room(prompt_len)
        return room if requested is None else min(room, requested)

    def out_of_vocab(self, token_ids: list[int]) -> list[int]:
        """The first few ids outside [0, vocab_size), or []."""
        return [t for t in token_ids if not 0 <= t < self.vocab_size][:5]

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = self.out_of_vocab(token_ids)
        if bad:
            raise ParamError(param, f"token ids out of range [0, {self.vocab_size}) in {param}: {bad}")

    def check_prompt(self, token_ids: list[int]) -> None:
        """Not empty, every id in the vocabulary, room left to generate."""
        if not token_ids:
            raise ParamError("prompt", "prompt is empty")
        self.check_token_ids(token_ids, "prompt")
        if self.room(len(token_ids)) < 1:
            raise ParamError("prompt", f"prompt has {len(token_ids)} tokens; the maximum context length is "
                                       f"{self.max_model_len}, which leaves no room to generate",
                             code="context_length_exceeded")

    def check_fits(self, prompt_len: int, requested: int | None) -> None:
        """The API's rule (as vLLM's server): prompt + max_tokens must fit the context, no clamping."""
        if requested is not None and requested > self.room(prompt_len) or self.room(prompt_len) < 1:
            asked = requested or 1
            raise ParamError("max_tokens", f"This model's maximum context length is {self.max_model_len} tokens. "
                                           f"However, you requested {prompt_len + asked} tokens ({prompt_len} in the "
                                           f"prompt, {asked} for the completion).", code="context_length_exceeded")

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(token_ids)
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise ParamError("logit_bias", f"logit_bias token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if params.structured_outputs is not None:
            from tandem.engine.structured_output import check_structured_outputs  # xgrammar: only when asked

            check_structured_outputs(params.structured_outputs)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.vocab_size:
                raise ParamError(name, f"{name}={k} exceeds the vocabulary size {self.vocab_size}")

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ParamError("prompt", "prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
        raise ParamError("prompt", f"prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """n > 1 fans out into n single-sample requests; seeded ones get seed + index (as vLLM)."""
    child = params.clone()
    child.n = 1
    if child.seed is not None:
        child.seed += index
    return child
