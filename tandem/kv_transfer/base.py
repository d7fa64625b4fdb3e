"""The scheduler-side KV connector interface: the hooks the scheduler calls, with vLLM's names.

A leaf module (no torch, no sockets): the scheduler depends on this interface only, and any KV
source or sink implements it (``tandem.kv_transfer.connector.KVConnector`` for disaggregated
prefill/decode; a KV offload tier next). ``KVConnectorBase``'s hooks do nothing: a subclass
overrides the ones it needs. The scheduler owns requests and the block table; the connector owns
what a transfer needs beyond them (requests waiting for their KV, blocks parked until a transfer
ends, leases) and its own counters. Blocks the connector parks come back through ``take_finished``
and the scheduler frees them; the connector never touches the block pool.

Call order, each from the core thread:
- ``add_request`` when a request arrives (raises ValueError to refuse it);
- ``take_finished`` at the start of a step (``Scheduler.update_transfers``);
- for a waiting request, after the local prefix lookup, ``get_num_new_matched_tokens``; when it
  returns tokens to load the scheduler allocates blocks for the prompt and calls
  ``update_state_after_alloc`` (the request then waits, WAITING_FOR_REMOTE_KVS, until
  ``take_finished`` hands it back);
- ``build_connector_meta`` at the end of ``schedule()``;
- ``progress`` after a step computed a chunk (and with no blocks before a preemption frees them);
- ``request_finished`` when a request ends, with its blocks already out of its table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# Request.error of a request whose KV transfer failed starts with this (the API answers 502 for it;
# any other error is the engine's own failure on that request: 500).
KV_TRANSFER_FAILED = "KV transfer failed"

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVCacheBlock
    from tandem.engine.request import Request
    from tandem.kv_offload.stats import OffloadStats
    from tandem.kv_transfer.stats import TransferStats
    from tandem.scheduler_output import SchedulerOutput


def load_key(request: Request) -> str:
    """Names one KV load (``request_id#serial``): a request id may be reused while an aborted load
    of the earlier request is still winding down, and its result must not reach the new one."""
    return f"{request.request_id}#{request.serial}"


def refuse_kv_transfer(request: Request) -> None:
    """What a worker without a connector says to a request that asks for a KV transfer."""
    if request.remote_ticket is not None:
        raise ValueError("this worker does not accept remote KV (start it with --role decode or both)")
    if request.remote_decode_lease:
        raise ValueError("this worker does not prefill for others (start it with --role prefill or both)")


@dataclass
class FinishedTransfer:
    """One thing the connector finished since the last step, applied by the scheduler in order."""

    free: list[KVCacheBlock] = field(default_factory=list)  # parked blocks handed back: free them
    request: Request | None = None  # a request whose load ended (it waits no more)
    ok: bool = False  # its KV is in its blocks up to request.kv_load_tokens: admit it like a prefix hit
    error: str | None = None  # not ok: end it with finish_reason "error"; None: compute it here
    cached: bool = False  # ok, from this worker's own cache tiers: the tokens count as cached in its usage


@dataclass
class TierChange:
    """Blocks an offload tier (``medium``: CPU, DISK) now holds (``stored``) or no longer holds; the
    core turns these into KV events (``BlockStored`` / ``BlockRemoved`` with that medium)."""

    medium: str
    stored: bool
    blocks: list[tuple[bytes, tuple[int, ...]]]  # (block hash, its tokens)


class KVConnectorBase:
    """Scheduler-side hooks; every default does nothing (a connector that transfers nothing)."""

    def add_request(self, request: Request) -> None:
        """A request arrives; raise ValueError when this connector cannot serve its transfer."""
        refuse_kv_transfer(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens past the ``num_computed_tokens`` cached locally whose KV this connector can bring,
        and whether it loads them asynchronously (the request waits until ``take_finished``).
        Must not change state when it returns tokens: the scheduler may find no room and ask again."""
        return 0, False

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """Blocks for the request are allocated (``block_ids``, its whole table); start loading
        ``num_external_tokens`` tokens after ``request.num_computed_tokens`` into them."""

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        """What the worker half needs for this step (attached to the SchedulerOutput), or None."""
        return None

    def progress(self, request: Request, block_ids: list[int], num_computed_tokens: int) -> None:
        """A running request's KV is computed up to ``num_computed_tokens`` in ``block_ids``; called
        with ``([], 0)`` before its blocks are freed by a preemption."""

    def request_finished(self, request: Request, blocks: list[KVCacheBlock]) -> tuple[bool, dict | None]:
        """The request ended (``request.status`` is final). Returns ``(delay_free_blocks,
        kv_transfer_params)``: True when the connector keeps ``blocks`` (handed back later through
        ``take_finished``), and the params to report with its output."""
        return False, None

    def take_finished(self) -> list[FinishedTransfer]:
        """Loads that ended and parked blocks that may be freed, since the last call."""
        return []

    def has_pending(self) -> bool:
        """Loads running or blocks parked: the engine has transfer work even with no request."""
        return False

    @property
    def loading(self) -> Mapping[str, Request]:
        """Request id -> request waiting for its KV (WAITING_FOR_REMOTE_KVS)."""
        return {}

    def transfer_state(self) -> tuple:
        """Changes whenever parked blocks or loads change (the core reports idle-time changes)."""
        return ()

    def report(self) -> TransferStats | None:
        return None

    def wait(self, timeout_s: float) -> None:
        """Nothing can run until a transfer ends: give its threads the time (at most ``timeout_s``)."""
        time.sleep(timeout_s)

    def offload_busy(self) -> bool:
        """KV offload copies are queued or running (they always end, unlike a P/D lease)."""
        return False

    def offload_report(self) -> OffloadStats | None:
        """Counters of the KV offload tiers (``tandem.kv_offload``), or None without them."""
        return None

    def take_tier_changes(self) -> list[TierChange]:
        """What the offload tiers stored or dropped since the last call."""
        return []

    def check_idle(self) -> None:
        """Assert that nothing is queued or held (tests, after the last request ended)."""

    def close(self) -> None:
        pass
