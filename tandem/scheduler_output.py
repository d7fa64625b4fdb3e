"""What the scheduler hands the model runner each step: the contract between the engine (above)
and the runner (below), in a leaf module so that neither imports the other's package for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tandem.sampling_params import SamplingParams

PLACEHOLDER_TOKEN = -1  # a chunk's token sampled by the step before it, filled in on the device


@dataclass
class NewRequestData:
    """Sent once per request, the first time it is scheduled: what the runner keeps for sampling."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledChunk:
    request_id: str
    token_ids: list[int]  # the tokens whose KV is computed this step
    start_pos: int  # position of token_ids[0] == num_computed_tokens before the step
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the chunk reaches the last known token: sample the next one
    num_prompt_tokens: int
    serial: int = 0  # Request.serial: a step in flight never applies to a later request reusing the id
    # speculative decoding: the last num_draft_tokens of token_ids are proposals to verify (sample is
    # True; the runner emits the accepted ones plus one of the target's)
    num_draft_tokens: int = 0
    # speculation with a draft model: after the step, propose this many drafts for the next one (the
    # block table covers that many positions past the chunk: the drafter's scratch)
    num_lookahead_tokens: int = 0


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: list[str] = field(default_factory=list)
    kv_connector_metadata: Any = None  # KVConnectorBase.build_connector_meta, for the worker half
    # structured outputs: request id -> its grammar's token bitmask row (int32 words) for this step
    grammar_bitmask: dict[str, Any] | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
