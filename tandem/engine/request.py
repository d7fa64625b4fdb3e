"""Per-request state owned by the scheduler. Plain Python: no torch, no sockets."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from tandem.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.engine.protocol import EngineCoreRequest
    from tandem.engine.structured_output import StructuredRequest




class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    WAITING_FOR_REMOTE_KVS = 3  # blocks allocated, KV being pulled from a prefill worker
    # Everything from here on is terminal: a request reaches exactly one of these, once.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",  # e.g. a failed KV transfer under policy "fail"
}




class Request:
    """One sequence being generated.

    NOTE: ``all_token_ids == prompt_token_ids + output_token_ids`` and
    ``0 <= num_computed_tokens <= num_tokens``; KV for the first ``num_computed_tokens`` tokens is
    in the cache blocks listed in the KV cache manager for this request. Under asynchronous
    scheduling a step may be scheduled before the previous one's output is applied: its
    ``num_in_flight_tokens`` follow the computed ones, and ``num_pending_tokens`` were sampled by
    steps in flight, their values not known yet (PLACEHOLDER_TOKEN in the chunk that follows).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        parent_id: str | None = None,
        max_tokens: int,
        remote_ticket=None,
        do_remote_decode: bool | str = False,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        # n > 1: the children of one prompt share this id; the scheduler uses it to let one child
        # prefill first so that its siblings hit the prompt's blocks in the prefix cache.
        self.parent_id = parent_id
        self.max_tokens = max_tokens
        self.status = RequestStatus.WAITING
        self.structured: StructuredRequest | None = None  # structured outputs: the grammar's state
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        self.num_in_flight_tokens = 0  # scheduled, not yet applied by update_from_output
        self.num_pending_tokens = 0  # sampled by steps in flight, values unknown
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until then
        self.prefix_queried = False  # counted in the prefix-cache statistics
        self.num_preemptions = 0
        self.num_step_tokens = 0  # output tokens the latest applied step appended (> 1: accepted drafts)
        # speculative decoding: (verified steps with drafts, draft tokens, accepted drafts) so far
        self.spec_counts = (0, 0, 0)
        self.serial = 0  # set by the scheduler on add: unique per scheduler, unlike a reusable request_id
        # Disaggregation. Decode side: a verified Ticket for the prompt's KV on a prefill worker,
        # cleared once loaded (kv_loaded until admitted) or given up. Prefill side: hold the blocks
        # under a lease when the request finishes, and report the ticket in kv_transfer_params.
        self.remote_ticket = remote_ticket
        self.kv_loaded = False
        self.kv_load_tokens = 0  # prompt tokens whose KV the current load brings
        # True, or the lease id a router chose so that the decode leg could start before this one ended
        self.do_remote_decode = do_remote_decode
        self.kv_transfer_params: dict | None = None
        self.error: str | None = None  # why a FINISHED_ERROR request failed
        # Chained block hashes of this request's full blocks, extended as tokens arrive.
        self.block_hashes: list[bytes] = []
        # Phases on the core's monotonic clock: queued (created in the core), scheduled (first admitted to run;
        # a disaggregated decode leg's KV load counts as queueing), first token.
        self.queued_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @classmethod
    def from_engine_core_request(cls, request: EngineCoreRequest) -> Request:
        """The core's state for a request the InputProcessor built (in this process or decoded
        from the API process's message)."""
        return cls(request.request_id, request.prompt_token_ids, request.sampling_params,
                   arrival_time=request.arrival_time, priority=request.priority, cache_salt=request.cache_salt,
                   parent_id=request.parent_id, max_tokens=request.max_tokens,
                   remote_ticket=request.remote_ticket, do_remote_decode=request.do_remote_decode)

    def phase_times(self, now: float) -> tuple[float, float, float] | None:
        """(queue, prefill, decode) seconds of a request that finished at ``now`` with a token,
        as vLLM's request_{queue,prefill,decode}_time_seconds define them."""
        if self.scheduled_time is None or self.first_token_time is None:
            return None
        return (self.scheduled_time - self.queued_time, self.first_token_time - self.scheduled_time,
                now - self.first_token_time)

    @property
    def remote_decode_lease(self) -> str | None:
        """The lease id a router named for this prefill (concurrent legs), else None."""
        return self.do_remote_decode if isinstance(self.do_remote_decode, str) else None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
