"""Result objects returned by ``LLM.generate``; names and fields follow vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class TopLogprobs(msgspec.Struct, array_like=True):
    """Per sampled (or scored prompt) position: the chosen token's logprob and rank, plus the
    top-k alternatives (tandem/runner/sampler.py makes them)."""
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per position: token id -> Logprob (the sampled token plus the top-k alternatives).
SampleLogprobs = list[dict[int, Logprob]]
# Same for the prompt; position 0 has no logprob and is None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    kv_transfer_params: dict | None = None  # prefill side of a disaggregated request: pass to the decode worker
    error: str | None = None  # why a request finished with finish_reason "error"
