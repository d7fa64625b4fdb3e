"""The schema between the engine's front end and its core (msgspec structs, never pickle).

``EngineCoreRequest`` (built once by the InputProcessor) goes in, ``EngineCoreOutput`` (carrying
``TopLogprobs``, the one logprobs type from the sampler to the OutputProcessor) comes out. The
same structs are used in-process (offline ``LLMEngine``) and over ZMQ (``AsyncLLM`` <->
``core_proc``), where every ZMQ message is two frames: the shared secret of this engine, then one msgpack-encoded
tagged union member. Frames beyond MAX_MESSAGE_BYTES are refused by the socket (ZMQ_MAXMSGSIZE).
"""

from __future__ import annotations

import hmac

import msgspec

from tandem.kv_offload.stats import OffloadStats
from tandem.kv_transfer.stats import TransferStats
from tandem.kv_transfer.ticket import Ticket
from tandem.outputs import TopLogprobs
from tandem.sampling_params import SamplingParams
from tandem.spec_decode.planner import SpecDecodeStats

MAX_MESSAGE_BYTES = 64 * 2**20


# -- API process -> engine core ------------------------------------------------------------------
class EngineCoreRequest(msgspec.Struct, tag=True):
    """One sequence to generate, as the core takes it (``Request.from_engine_core_request``)."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # validated again on decode (its __post_init__); carries the EOS ids
    max_tokens: int
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None  # n > 1: the id the children share
    remote_ticket: Ticket | None = None  # decode side of a disaggregated request (verified by the API process)
    do_remote_decode: bool | str = False  # prefill side: hold the blocks when finished (str: under this lease id)


class FinishRequests(msgspec.Struct, tag=True):
    """Abort (status "abort") or stop (status "stop", a stop string found by the API process)."""
    request_ids: list[str]
    status: str = "abort"
    stop_reason: str | None = None


class Shutdown(msgspec.Struct, tag=True):
    pass


CoreInput = EngineCoreRequest | FinishRequests | Shutdown


# -- engine core -> API process ------------------------------------------------------------------
class EngineCoreOutput(msgspec.Struct, array_like=True):
    """What one core step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TopLogprobs] | None = None  # one per new token, for requests asking logprobs
    # (first prompt position scored, entries) for the prompt chunk computed this step
    prompt_logprobs: tuple[int, list[TopLogprobs]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None  # prefill side: the ticket for the decode worker
    error: str | None = None  # finish_reason "error": what went wrong
    phase_times: tuple[float, float, float] | None = None  # finished: (queue, prefill, decode) seconds
    # speculation on: the request's (verified steps with drafts, draft tokens, accepted drafts) so far
    spec_counts: tuple[int, int, int] | None = None


class EngineStats(msgspec.Struct):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    transfer: TransferStats | None = None
    offload: OffloadStats | None = None  # KV offload tiers (tandem/kv_offload)
    spec_decode: SpecDecodeStats | None = None  # speculative decoding (tandem/spec_decode)
    expert_imbalance: list[float] = []  # MoE: per sparse layer, max/mean expert load since the last report
    new_step_tokens: list[int] = []  # tokens of each step since the previous report


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats


class Ready(msgspec.Struct, tag=True):
    """Sent once the model is loaded and the KV cache allocated."""
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    hf_config_json: str


class CoreFailed(msgspec.Struct, tag=True):
    error: str


CoreMessage = StepOutputs | Ready | CoreFailed


class Codec:
    """Encoder/decoder pair for one direction, checking the shared secret on every message."""

    def __init__(self, secret: bytes, decode_type) -> None:
        self.secret = secret
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(decode_type)

    def encode(self, msg) -> list[bytes]:
        return [self.secret, self.encoder.encode(msg)]

    def decode(self, frames: list[bytes]):
        """Raises PermissionError on a wrong secret, msgspec.DecodeError/ValidationError on junk."""
        if len(frames) != 2 or not hmac.compare_digest(frames[0], self.secret):
            raise PermissionError("message without this engine's secret")
        return self.decoder.decode(frames[1])
