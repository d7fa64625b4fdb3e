"""Messages between the API process and the engine-core process (msgspec msgpack, never pickle).

Every ZMQ message is two frames: the shared secret of this engine, then one msgpack-encoded
tagged union member. Frames beyond MAX_MESSAGE_BYTES are refused by the socket (ZMQ_MAXMSGSIZE).
"""

from __future__ import annotations

import hmac

import msgspec

from tandem.kv_transfer.ticket import Ticket
from tandem.sampling_params import SamplingParams

MAX_MESSAGE_BYTES = 64 * 2**20


# -- API process -> engine core ------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # validated again on decode (its __post_init__); carries the EOS ids
    max_tokens: int
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None
    remote_ticket: Ticket | None = None  # decode side of a disaggregated request (verified by the API process)
    do_remote_decode: bool | str = False  # prefill side: hold the blocks when finished (str: under this lease id)


class FinishRequests(msgspec.Struct, tag=True):
    """Abort (status "abort") or stop (status "stop", a stop string found by the API process)."""
    request_ids: list[str]
    status: str = "abort"
    stop_reason: str | None = None


class Shutdown(msgspec.Struct, tag=True):
    pass


CoreInput = AddRequest | FinishRequests | Shutdown


# -- engine core -> API process ------------------------------------------------------------------
class WireLogprobs(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class WireOutput(msgspec.Struct, array_like=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[WireLogprobs] | None = None
    prompt_logprobs_start: int | None = None
    prompt_logprobs: list[WireLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None
    error: str | None = None
    phase_times: tuple[float, float, float] | None = None  # finished: (queue, prefill, decode) seconds


class TransferStats(msgspec.Struct):
    """Cumulative KV transfer counters of a disaggregated worker (tandem/kv_transfer); the
    connector keeps one and reports a copy with every StepOutputs."""
    loads_ok: int = 0
    loads_shm: int = 0  # of loads_ok: copied from a shared-memory region on this host
    bytes_received: int = 0
    seconds_total: float = 0.0
    new_durations: list[float] = []  # load durations since the previous report
    failures: dict[str, int] = {}  # kind -> count
    recomputed: int = 0  # failed loads prefilled locally (policy recompute)
    local_skips: int = 0  # tickets not needed: every block was already cached here
    leases_held: int = 0
    leases_issued: int = 0
    leases_expired: int = 0
    bytes_sent: int = 0


class EngineStats(msgspec.Struct):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    transfer: TransferStats | None = None


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[WireOutput]
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
