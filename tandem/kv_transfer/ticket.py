"""What a prefill worker hands out and a decode worker redeems: the signed transfer ticket
(``kv_transfer_params`` in HTTP bodies, as in vLLM) and the compatibility hash of the KV layout.

NOTE: a ticket is only honoured when its MAC verifies under the fleet's shared secret, its
compatibility hash equals the decode worker's own and its prompt hash equals the decode request's
prompt; anything else is refused before a single block is allocated.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import msgspec

LAYOUT_VERSION = "blocks-nhd-v1"  # per layer: K and V as [num_blocks, block_size, num_kv_heads, head_dim]

_enc = msgspec.msgpack.Encoder()


def compat_hash(hf_config: dict, dtype: str, block_size: int, kv_cache_dtypes: list[str],
                kv_scales: list[tuple[float, float]]) -> str:
    """Equal only when two workers' KV blocks are interchangeable byte for byte and mean the same
    values: model, dtype, block size, layout, every layer's cache dtype (FP8 or not, skipped layers
    included) and every layer's FP8 (k_scale, v_scale)."""
    payload = json.dumps({"model": hf_config, "dtype": dtype, "block_size": block_size, "layout": LAYOUT_VERSION,
                          "kv_cache_dtypes": kv_cache_dtypes, "kv_scales": kv_scales},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(_enc.encode(token_ids)).hexdigest()[:32]


class Ticket(msgspec.Struct, forbid_unknown_fields=True):
    """The prefill side's promise: blocks ``block_ids`` on ``engine`` hold the KV of the first
    ``num_tokens`` tokens of the prompt with hash ``prompt``, until the lease ``lease_id`` ends.
    A pending ticket is a router's promise that such a lease is being computed."""

    do_remote_prefill: bool
    engine: str  # tcp://host:port of the prefill worker's KV sender
    lease_id: str
    block_ids: list[int]
    num_tokens: int
    block_size: int
    compat: str
    prompt: str
    lease_s: float
    kv_bytes_per_token: int
    # issued by a router before the prefill ran (concurrent legs): no block ids yet; the decode
    # side pulls by block index and the prefill worker answers once its lease exists
    pending: bool = False
    mac: str = ""

    def __post_init__(self) -> None:
        self.lease_s = float(self.lease_s)  # canonical: an int would sign differently after a JSON round trip

    def signed_payload(self) -> bytes:
        fields = [getattr(self, f) for f in self.__struct_fields__ if f != "mac"]
        return _enc.encode(fields)


def key_id(secret: bytes) -> str:
    """A public fingerprint of a KV transfer secret: workers publish it (``tandem:kv_transfer_key_info``)
    so a router can tell that two of them cannot redeem each other's tickets, without the secret."""
    return hmac.new(secret, b"tandem kv transfer key id", hashlib.sha256).hexdigest()[:16]


def sign(ticket: Ticket, secret: bytes) -> Ticket:
    ticket.mac = hmac.new(secret, ticket.signed_payload(), hashlib.sha256).hexdigest()
    return ticket


class TicketError(ValueError):
    """A ticket that must not be redeemed; the message says why (HTTP 400)."""


def parse_ticket(params: dict, secret: bytes, prompt_token_ids: list[int]) -> Ticket:
    """kv_transfer_params from a request body -> a verified Ticket, or TicketError."""
    try:
        ticket = msgspec.convert(params, Ticket)
    except msgspec.ValidationError as e:
        raise TicketError(f"kv_transfer_params: {e}") from None
    expected = hmac.new(secret, ticket.signed_payload(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, ticket.mac):
        raise TicketError("kv_transfer_params: signature does not verify (forged, or signed by a worker or router "
                          "that does not share this worker's $TANDEM_KV_TRANSFER_SECRET)")
    if ticket.prompt != prompt_hash(prompt_token_ids):
        raise TicketError("kv_transfer_params: issued for a different prompt")
    if ticket.num_tokens > len(prompt_token_ids):
        raise TicketError("kv_transfer_params: num_tokens exceeds the prompt")
    if ticket.pending and ticket.block_ids:
        raise TicketError("kv_transfer_params: a pending ticket names no blocks")
    if not ticket.pending and len(ticket.block_ids) * ticket.block_size < ticket.num_tokens:
        raise TicketError("kv_transfer_params: block list does not cover num_tokens")
    return ticket
