"""The KV offload tiers' counters, reported with every engine step (a leaf module)."""

from __future__ import annotations

import msgspec


class OffloadStats(msgspec.Struct):
    """Cumulative counters and current usage of the host (CPU) and disk tiers of one engine."""
    host_blocks_total: int = 0
    host_blocks_used: int = 0
    disk_blocks_total: int = 0
    disk_blocks_used: int = 0
    stored_blocks: int = 0  # device -> host copies
    stored_bytes: int = 0
    store_seconds: float = 0.0
    disk_written_blocks: int = 0
    hit_tokens: dict[str, int] = {}  # medium (CPU, DISK) -> prompt tokens loaded from it
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    loads_failed: int = 0  # loads that fell back to recomputing the prompt
    corrupt_files: int = 0  # disk files skipped: bad checksum, foreign or unreadable
