"""KV cache events: what a router needs to keep a per-worker index of cached blocks.

msgspec structs (tagged unions), so they can cross a process boundary as msgpack without pickle.
Field names follow vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``. ``medium`` says
which tier holds the blocks: None for the engine's own KV cache (the device pool), ``"CPU"`` for the
host tier and ``"DISK"`` for the disk tier of KV offloading (``tandem.kv_offload``). A block may be
in several tiers at once; an event changes only its own tier.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[bytes]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    """Every block of the device pool is gone (offload tiers keep theirs)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events of one engine step, in order. ``seq`` increases by one per batch per worker."""

    seq: int
    ts: float
    events: list[KVEvent]
