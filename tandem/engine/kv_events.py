"""KV cache events: what a router needs to keep a per-worker index of cached blocks.

msgspec structs (tagged unions), so they can cross a process boundary as msgpack without pickle.
Field names follow vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[bytes]


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events of one engine step, in order. ``seq`` increases by one per batch per worker."""

    seq: int
    ts: float
    events: list[KVEvent]
