"""The KV hand-off's counters, reported by the connector with every engine step (a leaf module)."""

from __future__ import annotations

import msgspec


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
