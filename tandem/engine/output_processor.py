"""OutputProcessor: EngineCoreOutputs -> RequestOutputs. Detokenizes, finds stop strings,
decodes logprobs, aggregates the n children of a request.

It tracks every request from ``add_request`` until it finished, was aborted or failed, and ends
requests in the core when it finds a stop string (the core knows token ids only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem.engine.detokenizer import IncrementalDetokenizer, decode_token
from tandem.engine.input_processor import ProcessedRequest
from tandem.engine.protocol import EngineCoreOutput, EngineCoreRequest
from tandem.engine.request import RequestStatus
from tandem.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, TopLogprobs

# RequestOutput.metrics keys of EngineCoreOutput.phase_times (seconds, measured by the engine core)
PHASES = ("queue_time", "prefill_time", "decode_time")
# RequestOutput.metrics keys of EngineCoreOutput.spec_counts (summed over a request's n completions),
# named as vLLM's spec_decode counters
SPEC_COUNTS = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")


class CoreHandle(Protocol):
    """What the front end needs from an engine core, in this process or behind a socket."""

    def add_request(self, request: EngineCoreRequest) -> None: ...

    def finish_requests(self, request_ids: list[str], status: RequestStatus = ...,
                        stop_reason: int | str | None = None) -> None: ...


@dataclass
class _Child:
    index: int
    request_id: str
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] = field(default_factory=list)
    spec_counts: tuple[int, int, int] | None = None  # the latest EngineCoreOutput.spec_counts


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


class OutputProcessor:
    def __init__(self, core: CoreHandle, tokenizer: Any) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Child]] = {}

    # -- requests --------------------------------------------------------------------------------
    def check_new(self, request_id: str) -> None:
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in flight")

    def submit(self, request: ProcessedRequest) -> None:
        """Track the request and send its children to the core, all or nothing."""
        self.check_new(request.request_id)
        params, token_ids = request.params, request.prompt_token_ids
        parent = _Parent(request.request_id, request.prompt, token_ids, [],
                         _empty_prompt_logprobs(len(token_ids)) if params.prompt_logprobs is not None else None,
                         request.arrival_time)
        for i, core_req in enumerate(request.children):
            child = _Child(i, core_req.request_id,
                           IncrementalDetokenizer(self.tokenizer, core_req.sampling_params, token_ids),
                           [] if params.logprobs is not None else None,
                           0.0 if params.logprobs is not None else None)
            parent.children.append(child)
            self._children[child.request_id] = (parent, child)
        self._parents[request.request_id] = parent
        sent: list[str] = []
        try:
            for core_req in request.children:
                self.core.add_request(core_req)
                sent.append(core_req.request_id)
        except BaseException:  # NOTE: a request the core did not take is not tracked here either
            if sent:
                self.core.finish_requests(sent, RequestStatus.FINISHED_ABORTED)
            self._release(parent)
            raise

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for rid in ids:
            parent = self._parents.get(rid)
            if parent is None:
                continue
            live = [c for c in parent.children if c.finish_reason is None]
            self.core.finish_requests([c.request_id for c in live], RequestStatus.FINISHED_ABORTED)
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
    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
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
            if out.spec_counts is not None:
                child.spec_counts = out.spec_counts
        outputs = [self._make_output(p) for p in touched.values()]
        for parent in touched.values():
            if parent.finished:
                parent.metrics["finished_time"] = now
                self._release(parent)
        return outputs

    def _process_tokens(self, child: _Child, out: EngineCoreOutput) -> None:
        new, stop_str = self._detokenize(child, out)
        child.token_ids.extend(new)
        if child.logprobs is not None and out.new_logprobs:
            for lp in out.new_logprobs[:len(new)]:  # a stop string may have dropped the last tokens
                child.logprobs.append(self._logprob_dict(lp))
                child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp.logprob
        if out.finish_reason is not None and len(new) == len(out.new_token_ids):
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        elif stop_str is not None:
            if out.finish_reason is None:
                self.core.finish_requests([out.request_id], RequestStatus.FINISHED_STOPPED, stop_str)
            child.finish_reason, child.stop_reason = "stop", stop_str

    @staticmethod
    def _detokenize(child: _Child, out: EngineCoreOutput) -> tuple[list[int], str | None]:
        """Feed the step's tokens to the detokenizer -> (the tokens kept, the stop string matched).
        Several tokens in one step (accepted draft tokens) with stop strings go one at a time, so
        that the tokens after the one completing a stop string are dropped, as if never sampled."""
        new = out.new_token_ids
        stopped_by_token = out.finish_reason == "stop"
        if len(new) == 1 or not child.detok.has_stop_strings:
            return new, child.detok.update(new, stop_terminated=stopped_by_token)
        for i in range(len(new)):
            stop_str = child.detok.update(new[i:i + 1], stop_terminated=stopped_by_token and i == len(new) - 1)
            if stop_str is not None:
                return new[:i + 1], stop_str
        return new, None

    def _record_prompt_logprobs(self, parent: _Parent, first_pos: int, entries: list[TopLogprobs]) -> None:
        store = parent.prompt_logprobs
        assert store is not None, "prompt logprobs arrive only for requests that asked for them"
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
        counted = [c.spec_counts for c in parent.children if c.spec_counts is not None]
        if counted:
            metrics.update((key, sum(column)) for key, column in zip(SPEC_COUNTS, zip(*counted)))
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             parent.finished, parent.prompt_logprobs, cached, metrics,
                             parent.kv_transfer_params, parent.error)

    def _release(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for c in parent.children:
            self._children.pop(c.request_id, None)


def _empty_prompt_logprobs(num_prompt_tokens: int) -> PromptLogprobs:
    """One slot per prompt position; position 0 stays None (nothing before it to score it)."""
    return [None] * num_prompt_tokens
