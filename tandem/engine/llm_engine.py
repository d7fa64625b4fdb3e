"""LLMEngine: tokenize -> EngineCore (scheduler, runner) -> detokenize -> outputs, in one process.

One ``step()`` is one EngineCore step (one model forward over a mixed batch of decodes and prefill
chunks) followed by output processing: n > 1 aggregation, logprob decoding, incremental
detokenization. Stop strings are found here and end the request in the core before its next step.
NOTE: every accepted request ends exactly once (finished, aborted or failed); its blocks are free
from that moment.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from tandem.config import EngineConfig
from tandem.engine.detokenizer import IncrementalDetokenizer, decode_token
from tandem.engine.core import CoreOutput, EngineCore
from tandem.engine.request import Request, RequestStatus
from tandem.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from tandem.runner.sampler import TopLogprobs
from tandem.sampling_params import ParamError, SamplingParams
from tandem.tokenizer import eos_token_ids, load_tokenizer

# RequestOutput.metrics keys of CoreOutput.phase_times (seconds, measured by the engine core)
PHASES = ("queue_time", "prefill_time", "decode_time")

logger = logging.getLogger(__name__)

PromptType = str | dict


@dataclass
class _Child:
    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    prompt_logprobs: PromptLogprobs | None
    arrival_time: float
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    kv_transfer_params: dict | None = None  # prefill side of a disaggregated request: the ticket
    error: str | None = None  # a child finished with "error" (e.g. its KV transfer failed)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class CoreHandle(Protocol):
    """What the processor needs from an engine core, in this process or behind a socket."""

    def add_request(self, request: Request) -> None: ...

    def finish_requests(self, request_ids: list[str], status: RequestStatus = ...,
                        stop_reason: int | str | None = None) -> None: ...


class Processor:
    """The text side of an engine: tokenize and validate requests, fan n > 1 out into children,
    and turn CoreOutputs into RequestOutputs (logprob decoding, detokenization, stop strings)."""

    def __init__(self, core: CoreHandle, model_dir: str, tokenizer_dir: str | None, hf_config: dict,
                 vocab_size: int, max_model_len: int) -> None:
        self.core = core
        self.hf_config = hf_config
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer, hf_config)
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Child]] = {}
        self._ids = itertools.count()

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    *, priority: int = 0, cache_salt: str | None = None,
                    arrival_time: float | None = None, remote_ticket=None, do_remote_decode: bool | str = False) -> str:
        params = (params or SamplingParams()).clone()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        params._eos_token_ids = set(self.eos_token_ids)
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        parent = _Parent(request_id, text, token_ids, [],
                         [None] + [None] * (len(token_ids) - 1) if params.prompt_logprobs is not None else None,
                         arrival)
        for i in range(params.n):
            child_params = params if params.n == 1 else _child_params(params, i)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(child_id, token_ids, child_params, arrival_time=arrival, priority=priority,
                          cache_salt=cache_salt, parent_id=request_id if params.n > 1 else None,
                          max_tokens=max_tokens, remote_ticket=remote_ticket, do_remote_decode=do_remote_decode)
            child = _Child(i, req, IncrementalDetokenizer(self.tokenizer, child_params, token_ids),
                           [] if params.logprobs is not None else None,
                           0.0 if params.logprobs is not None else None)
            parent.children.append(child)
            self._children[child_id] = (parent, child)
        self._parents[request_id] = parent
        sent: list[str] = []
        try:
            for child in parent.children:
                self.core.add_request(child.request)
                sent.append(child.request.request_id)
        except BaseException:  # NOTE: a request the core did not take is not tracked here either
            if sent:
                self.core.finish_requests(sent, RequestStatus.FINISHED_ABORTED)
            self._release(parent)
            raise
        return request_id

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

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ParamError("prompt", "prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ParamError("prompt", f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ParamError("prompt", f"prompt has {len(token_ids)} tokens; the maximum context length is "
                                       f"{self.max_model_len}, which leaves no room to generate")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise ParamError("logit_bias", f"logit_bias token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.vocab_size:
                raise ParamError(name, f"{name}={k} exceeds the vocabulary size {self.vocab_size}")

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for rid in ids:
            parent = self._parents.get(rid)
            if parent is None:
                continue
            live = [c for c in parent.children if c.finish_reason is None]
            self.core.finish_requests([c.request.request_id for c in live], RequestStatus.FINISHED_ABORTED)
            for child in live:
                child.finish_reason = "abort"
            outputs.append(self._make_output(parent))
            self._release(parent)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_requests(self) -> int:
        """Requests tracked here: added and not yet finished, aborted or failed."""
        return len(self._parents)

    # -- the step ---------------------------------------------------------------------------------
    def process_outputs(self, core_outputs: list[CoreOutput]) -> list[RequestOutput]:
        """Outputs of one core step -> one cumulative RequestOutput per request that advanced."""
        touched: dict[str, _Parent] = {}
        now = time.monotonic()
        for out in core_outputs:
            if out.request_id not in self._children:  # aborted here while the core was stepping
                continue
            parent, child = self._children[out.request_id]
            touched[parent.request_id] = parent
            if out.prompt_logprobs is not None:
                self._record_prompt_logprobs(parent, *out.prompt_logprobs)
            if out.new_token_ids:
                parent.first_token_time = parent.first_token_time or now
                parent.num_cached_tokens = out.num_cached_tokens
                self._process_tokens(child, out)
            elif out.finish_reason is not None:  # ended without a token (e.g. a failed KV transfer)
                child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            if out.kv_transfer_params is not None:
                parent.kv_transfer_params = out.kv_transfer_params
            if out.error is not None:
                parent.error = out.error
            if out.phase_times is not None:  # n > 1: the child that finished last
                parent.metrics.update(zip(PHASES, out.phase_times))
        outputs = [self._make_output(p) for p in touched.values()]
        for parent in touched.values():
            if parent.finished:
                parent.metrics["finished_time"] = now
                self._release(parent)
        return outputs

    def _process_tokens(self, child: _Child, out: CoreOutput) -> None:
        child.token_ids.extend(out.new_token_ids)
        if child.logprobs is not None and out.new_logprobs:
            for lp in out.new_logprobs:
                child.logprobs.append(self._logprob_dict(lp))
                child.cumulative_logprob += lp.logprob
        stopped_by_token = out.finish_reason == "stop"
        stop_str = child.detok.update(out.new_token_ids, stop_terminated=stopped_by_token)
        if out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        elif stop_str is not None:
            self.core.finish_requests([out.request_id], RequestStatus.FINISHED_STOPPED, stop_str)
            child.finish_reason, child.stop_reason = "stop", stop_str

    def _record_prompt_logprobs(self, parent: _Parent, first_pos: int, entries: list[TopLogprobs]) -> None:
        store = parent.prompt_logprobs
        for j, entry in enumerate(entries):
            if store[first_pos + j] is None:  # recomputed after preemption: keep the first
                store[first_pos + j] = self._logprob_dict(entry)

    def _logprob_dict(self, lp: TopLogprobs) -> dict[int, Logprob]:
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, decode_token(self.tokenizer, lp.token_id))}
        for rank, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(val, rank, decode_token(self.tokenizer, tid))
        return out

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=c.index,
                text=c.detok.get_next_output_text(c.finish_reason is not None, delta=False),
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in parent.children
        ]
        cached = parent.num_cached_tokens
        metrics = dict(parent.metrics, arrival_time=parent.arrival_time)
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             parent.finished, parent.prompt_logprobs, cached, metrics,
                             parent.kv_transfer_params, parent.error)

    def _release(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for c in parent.children:
            self._children.pop(c.request.request_id, None)



class LLMEngine(Processor):
    """Offline engine: a Processor over an EngineCore in the same process; one step() at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        core = EngineCore(config)
        super().__init__(core, config.model.model, config.model.tokenizer, core.hf_config, core.vocab_size,
                         core.max_model_len)
        # the core's parts, for introspection and tests
        self.runner, self.kv, self.scheduler = core.runner, core.kv, core.scheduler

    def step(self) -> list[RequestOutput]:
        return self.process_outputs(self.core.step())

    def take_kv_events(self):
        return self.core.take_kv_events()

    def assert_idle(self) -> None:
        """No request in flight: every block free, every reference count 0."""
        assert not self._parents, "engine still tracks requests"
        self.core.assert_idle()


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """n > 1 fans out into n single-sample requests; seeded ones get seed + index (as vLLM)."""
    child = params.clone()
    child.n = 1
    if child.seed is not None:
        child.seed += index
    return child
