"""Sampling parameters with vLLM's names and semantics.

Every bad value raises ``ValueError`` naming the parameter, so the server can map it to HTTP 400.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

_GREEDY_EPS = 1e-5
_INT32_MAX = 2**31 - 1


class SamplingType(Enum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class StructuredOutputsParams:
    """Constrain the output (vLLM's ``StructuredOutputsParams``): exactly one of a JSON schema
    (``json``, text or object), any JSON object (``json_object``), a regular expression, one of
    several strings (``choice``) or an EBNF grammar (``grammar``, xgrammar's dialect)."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = _json.dumps(self.json)  # one form on the wire and in the grammar cache
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, "structured_outputs",
               f"structured_outputs: give exactly one of json, json_object, regex, choice, grammar (got {given})")
        _check(self.choice is None or (bool(self.choice) and all(isinstance(c, str) and c for c in self.choice)),
               "structured_outputs", "structured_outputs.choice: a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Token ids that end generation besides the tokenizer's EOS (from generation_config.json).
    # Filled by the engine; not part of the public surface.
    _eos_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be an int >= 1, got {self.n!r}")
        _check(self.temperature >= 0.0, "temperature", f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and 0 <= self.top_k <= _INT32_MAX, "top_k",
               f"top_k must be -1 (disabled), 0 (disabled) or a positive int < 2**31, got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs",
               f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
               "prompt_logprobs", f"prompt_logprobs must be an int >= 0 or None, got {self.prompt_logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop or ()), "stop", "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids or ()), "stop_token_ids",
               "stop_token_ids must be non-negative ints")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                _check(tok >= 0, "logit_bias", f"logit_bias token id must be >= 0, got {tok}")
                _check(-100.0 <= bias <= 100.0, "logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
        _check(self.seed is None or isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64, "seed",
               f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        ids = set(self.stop_token_ids or [])
        if not self.ignore_eos:
            ids |= self._eos_token_ids
        return ids

    def clone(self) -> SamplingParams:
        copy = SamplingParams.__new__(SamplingParams)
        copy.__dict__.update(self.__dict__)
        copy.stop = list(self.stop or [])
        copy.stop_token_ids = list(self.stop_token_ids or [])
        copy.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        copy._eos_token_ids = set(self._eos_token_ids)
        return copy


class ParamError(ValueError):
    """A bad request parameter; ``param`` names it (OpenAI's error shape has a ``param`` field)."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # OpenAI's error code where it has one (context_length_exceeded)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)
