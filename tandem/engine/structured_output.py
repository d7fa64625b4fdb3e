"""Structured outputs with xgrammar (vLLM's default backend; it runs on a CPU).

Two halves. ``check_structured_outputs`` (the InputProcessor, in the API process or offline) builds
the grammar without a tokenizer, so a schema or grammar that does not parse is a 400 before the
request reaches the core. ``StructuredOutputManager`` (the engine core) compiles each request's
grammar against the tokenizer on a worker thread (xgrammar caches compiled grammars), keeps the
request waiting until it is ready, fills the token bitmask of every sampled row before a step,
and advances the request's matcher with the token it sampled.

NOTE: a request's matcher has accepted exactly its output tokens; steps are applied in order and
a preempted request keeps its output, so the matcher never rolls back. Under asynchronous
scheduling the next step's mask needs the token just sampled, so while a request with a grammar
is in the engine, EngineCore.step applies each step before scheduling the next (no overlap).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import xgrammar as xgr

from tandem.sampling_params import ParamError, StructuredOutputsParams

logger = logging.getLogger(__name__)


def choice_ebnf(choices: list[str]) -> str:
    """One of the strings exactly (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def check_structured_outputs(params: StructuredOutputsParams) -> None:
    """Raise ParamError when the schema, regex or grammar does not parse."""
    try:
        if params.json is not None:
            assert isinstance(params.json, str)  # normalised by StructuredOutputsParams
            xgr.Grammar.from_json_schema(params.json, any_whitespace=False)
        elif params.regex is not None:
            xgr.Grammar.from_regex(params.regex)
        elif params.grammar is not None:
            xgr.Grammar.from_ebnf(params.grammar)
        elif params.choice is not None:
            xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError of its own for bad input
        raise ParamError("structured_outputs", f"{params.kind} does not compile: {e}") from None


class StructuredRequest:
    """A request's grammar: compiling (``ready`` False), failed (``error``), or its matcher."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self._matcher: xgr.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self._future.done()

    @property
    def error(self) -> str | None:
        if not self._future.done() or self._future.exception() is None:
            return None
        return f"structured output grammar failed to compile: {self._future.exception()}"

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        if self._matcher is None:
            self._matcher = xgr.GrammarMatcher(self._future.result())
        return self._matcher

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (drafts) the grammar accepts in a row, short of one that would
        complete it (the target's own token may end it); the matcher is left as it was."""
        matcher, accepted = self.matcher, 0
        for token in tokens:
            if not matcher.accept_token(token):
                break
            if matcher.is_terminated():
                matcher.rollback(1)
                break
            accepted += 1
        if accepted:
            matcher.rollback(accepted)
        return accepted


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-grammar")

    def start(self, params: StructuredOutputsParams) -> StructuredRequest:
        """Compile off the step loop; the request waits until ``ready``."""
        return StructuredRequest(self._pool.submit(self._compile, params))

    def _compile(self, p: StructuredOutputsParams) -> xgr.CompiledGrammar:
        if p.json_object:  # OpenAI's json_object: an object, not any JSON value
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if p.json is not None:
            assert isinstance(p.json, str)
            return self.compiler.compile_json_schema(p.json, any_whitespace=False)
        if p.regex is not None:
            return self.compiler.compile_regex(p.regex)
        if p.choice is not None:
            return self.compiler.compile_grammar(choice_ebnf(p.choice))
        assert p.grammar is not None
        return self.compiler.compile_grammar(p.grammar)

    def bitmask(self, requests: dict[str, StructuredRequest],
                drafts: Mapping[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
        """request id -> its next-token bitmask row (int32 words, xgrammar's layout); for a request
        with drafts (which its grammar accepts: ``valid_prefix``), 1 + k rows: the mask before each
        draft and after the last."""
        drafts = drafts or {}
        counts = [1 + len(drafts.get(rid, ())) for rid in requests]
        mask = xgr.allocate_token_bitmask(sum(counts), self.info.vocab_size)
        rows: dict[str, torch.Tensor] = {}
        first = 0
        for (rid, structured), n in zip(requests.items(), counts):
            matcher, accepted, following = structured.matcher, 0, True
            for j in range(n):
                matcher.fill_next_token_bitmask(mask, first + j)
                if following and j < n - 1:  # a draft the grammar refuses is rejected by its mask
                    following = matcher.accept_token(drafts[rid][j])
                    accepted += following
            if accepted:
                matcher.rollback(accepted)
            rows[rid] = mask[first] if n == 1 else mask[first:first + n]
            first += n
        return rows

    @staticmethod
    def accept(request_id: str, structured: StructuredRequest, token: int) -> bool:
        """Advance the matcher; True when the grammar is complete (nothing may follow)."""
        matcher = structured.matcher
        if not matcher.is_terminated() and not matcher.accept_token(token):
            logger.warning("request %s: token %d is outside its grammar", request_id, token)
        return matcher.is_terminated()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
