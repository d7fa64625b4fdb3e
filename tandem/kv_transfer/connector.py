"""The KV connector as the scheduler sees it: one object per engine core with a sending half
(prefill: leases and a ROUTER serving pulls) and a receiving half (decode: pulls and heartbeats).

The scheduler plans through the hooks of ``tandem.kv_transfer.base.KVConnectorBase``; this class
keeps the disaggregation state behind them: requests pulling their prompt's KV (``loading``),
blocks of finished prefills held under a lease (``held``), blocks of aborted loads parked until
their one LoadResult (``_orphans``), the failure policy, and its ``TransferStats``. The halves
move bytes in their own threads. Everything here is called from the core thread.
NOTE: blocks a transfer may still write into are handed back only after its one LoadResult arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import msgspec
import zmq

from tandem.config import KVTransferConfig
from tandem.kv_transfer.base import KV_TRANSFER_FAILED, FinishedTransfer, KVConnectorBase, load_key
from tandem.kv_transfer.receiver import KVReceiver, LoadResult
from tandem.kv_transfer.sender import KVCaches, KVSender
from tandem.kv_transfer.shm import SharedKVRegion
from tandem.kv_transfer.stats import TransferStats
from tandem.kv_transfer.ticket import Ticket, prompt_hash, sign
from tandem.utils import cdiv

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVCacheBlock
    from tandem.engine.request import Request

_HOLD_FINISH_REASONS = ("stop", "length")  # a prefill that ended normally: its KV is complete


class KVConnector(KVConnectorBase):
    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, compat: str, block_size: int,
                 kv_bytes_per_token: int, region: SharedKVRegion | None = None) -> None:
        self.config, self.compat = config, compat
        self.block_size, self.kv_bytes_per_token = block_size, kv_bytes_per_token
        self.ctx = zmq.Context()
        self.sender = KVSender(config, kv_caches, compat, self.ctx, region) if config.sends else None
        self.receiver = KVReceiver(config, kv_caches, compat, self.ctx) if config.receives else None
        self.stats = TransferStats()
        self._prompts: dict[str, str] = {}  # expected lease id -> prompt hash, while its prefill runs
        # scheduler-side state (see the hooks below)
        self._loading: dict[str, Request] = {}  # request id -> request pulling its prompt's KV
        self.held: dict[str, list[KVCacheBlock]] = {}  # lease id -> blocks of a finished prefill
        self._orphans: dict[str, list[KVCacheBlock]] = {}  # load_key -> blocks of an aborted load
        self._redeeming: dict[str, Request] = {}  # ticket lease id -> the request still carrying it

    @property
    def failure_policy(self) -> str:
        return self.config.failure_policy

    # -- scheduler-side hooks (tandem.kv_transfer.base) --------------------------------------------
    def add_request(self, request: Request) -> None:
        ticket = request.remote_ticket
        if ticket is not None:
            if self.receiver is None:
                raise ValueError("this worker does not accept remote KV (start it with --role decode or both)")
            if ticket.lease_id in self._redeeming:
                raise ValueError("this KV ticket is already being redeemed on this worker")
            self.watch(ticket)
        if request.remote_decode_lease:
            self.expect(request.remote_decode_lease)
        if ticket is not None:
            self._redeeming[ticket.lease_id] = request

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        ticket = request.remote_ticket
        if ticket is None:
            return 0, False
        num_load = min(ticket.num_tokens, request.num_prompt_tokens - 1)  # the last prompt token is computed here
        if num_computed_tokens >= num_load:  # every block is cached here: the ticket is not needed
            self.release(ticket)
            self.stats.local_skips += 1
            self._drop_ticket(request)
            return 0, False
        return num_load - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        if not num_external_tokens:
            return
        ticket = request.remote_ticket
        num_hit = request.num_computed_tokens
        first, last = num_hit // self.block_size, cdiv(num_hit + num_external_tokens, self.block_size)
        remote = list(range(first, last)) if ticket.pending else ticket.block_ids[first:last]  # pending: indices
        self._loading[request.request_id] = request
        self.start_load(load_key(request), ticket, remote, block_ids[first:last])

    def progress(self, request: Request, block_ids: list[int], num_computed_tokens: int) -> None:
        lease_id = request.remote_decode_lease
        if lease_id:  # a decode leg may be waiting: stream full blocks (none: retracted)
            self.stream(lease_id, request.prompt_token_ids, block_ids,
                        min(num_computed_tokens, request.num_prompt_tokens) // self.block_size)

    def request_finished(self, request: Request, blocks: list[KVCacheBlock]) -> tuple[bool, dict | None]:
        delay = False
        if self._loading.get(request.request_id) is request:  # aborted mid-load: park until its result
            del self._loading[request.request_id]
            self._orphans[load_key(request)] = blocks
            self.cancel(load_key(request))  # the receiver releases the lease
            self._drop_ticket(request)
            blocks, delay = [], True
        if request.remote_ticket is not None:
            self.release(request.remote_ticket)  # never loaded: the prefill side may free now
            self._drop_ticket(request)
        if request.do_remote_decode and request.status.finish_reason in _HOLD_FINISH_REASONS:
            # prefill side: keep the finished prompt's blocks under a lease for a decode worker
            ticket = self.issue_ticket(request.prompt_token_ids,
                                       min(request.num_computed_tokens, request.num_prompt_tokens),
                                       [b.block_id for b in blocks], request.remote_decode_lease)
            if ticket is None:
                return delay, None
            self.held[ticket.lease_id] = blocks
            return True, msgspec.to_builtins(ticket)
        if request.remote_decode_lease:  # before the free (streaming invariant, sender.py)
            self.abandon(request.remote_decode_lease)  # its parked decode leg prefills locally
        return delay, None

    def take_finished(self) -> list[FinishedTransfer]:
        done = [FinishedTransfer(free=self.held.pop(lease_id, [])) for lease_id in self.take_ended_leases()]
        for result in self.take_load_results():
            orphan = self._orphans.pop(result.request_id, None)
            if orphan is not None:
                done.append(FinishedTransfer(free=orphan))
                continue
            req = self._loading.get(result.request_id.rpartition("#")[0])
            if req is None or load_key(req) != result.request_id:
                continue
            del self._loading[req.request_id]
            self._drop_ticket(req)
            if result.ok:
                done.append(FinishedTransfer(request=req, ok=True))
            elif self.failure_policy == "recompute" or result.kind == "prefill_failed":
                # prefill_failed: the prefill never happened there (concurrent legs): prefilling it
                # here is the fallback, as the router's for a failed prefill leg
                self.stats.recomputed += 1
                done.append(FinishedTransfer(request=req))
            else:
                done.append(FinishedTransfer(request=req,
                                             error=f"{KV_TRANSFER_FAILED} ({result.kind}): {result.message}"))
        return done

    def has_pending(self) -> bool:
        return bool(self._loading or self.held or self._orphans)

    @property
    def loading(self) -> Mapping[str, Request]:
        return MappingProxyType(self._loading)

    def transfer_state(self) -> tuple:
        return len(self.held), len(self._loading), len(self._orphans)

    def _drop_ticket(self, request: Request) -> None:
        ticket = request.remote_ticket
        if ticket is not None and self._redeeming.get(ticket.lease_id) is request:
            del self._redeeming[ticket.lease_id]
        request.remote_ticket = None

    # -- prefill side ------------------------------------------------------------------------------------
    def issue_ticket(self, prompt_token_ids: list[int], num_tokens: int, block_ids: list[int],
                     lease_id: str | None = None) -> Ticket | None:
        """Lease the blocks of a finished prefill (under ``lease_id`` when a router named it);
        None when this worker does not send."""
        if self.sender is None:
            return None
        prompt = (self._prompts.pop(lease_id, None) if lease_id else None) or prompt_hash(prompt_token_ids)
        lease = self.sender.hold(block_ids, prompt, lease_id)
        ticket = Ticket(True, self.sender.endpoint, lease.lease_id, list(block_ids), num_tokens, self.block_size,
                        self.compat, prompt, self.config.lease_s, self.kv_bytes_per_token)
        return sign(ticket, self.config.secret)

    def expect(self, lease_id: str) -> None:
        """A prefill under a router-named lease starts; ValueError when this worker does not send."""
        if self.sender is None:
            raise ValueError("this worker does not prefill for others (role decode)")
        self.sender.expect(lease_id)

    def abandon(self, lease_id: str) -> None:
        if self.sender is not None:
            self._prompts.pop(lease_id, None)
            self.sender.abandon(lease_id)

    def stream(self, lease_id: str, prompt_token_ids: list[int], block_ids: list[int], num_full: int) -> None:
        """An expected lease's prefill has its first ``num_full`` blocks computed (0: retracted)."""
        if self.sender is None:
            return
        prompt = self._prompts.get(lease_id)
        if prompt is None:
            prompt = self._prompts[lease_id] = prompt_hash(prompt_token_ids)
        self.sender.progress(lease_id, block_ids, num_full, prompt)

    def take_ended_leases(self) -> list[str]:
        return self.sender.take_ended() if self.sender is not None else []

    @property
    def num_leases(self) -> int:
        return self.sender.num_leases if self.sender is not None else 0

    # -- decode side ------------------------------------------------------------------------------------
    def _receiver(self) -> KVReceiver:
        if self.receiver is None:
            raise RuntimeError("this worker does not receive KV (role prefill)")
        return self.receiver

    def watch(self, ticket: Ticket) -> None:
        self._receiver().watch(ticket)

    def start_load(self, request_id: str, ticket: Ticket, remote_block_ids: list[int],
                   local_block_ids: list[int]) -> None:
        self._receiver().load(request_id, ticket, remote_block_ids, local_block_ids)

    def cancel(self, request_id: str) -> None:
        self._receiver().cancel(request_id)

    def release(self, ticket: Ticket) -> None:
        self._receiver().release(ticket)

    def take_load_results(self) -> list[LoadResult]:
        if self.receiver is None:
            return []
        results = self.receiver.take_results()
        for r in results:
            if r.ok:
                self.stats.loads_ok += 1
                self.stats.loads_shm += r.transport == "shm"
                self.stats.bytes_received += r.num_bytes
                self.stats.seconds_total += r.seconds
                self.stats.new_durations.append(r.seconds)
            elif r.kind != "cancelled":
                self.stats.failures[r.kind] = self.stats.failures.get(r.kind, 0) + 1
        return results

    def report(self) -> TransferStats:
        """Counters for /metrics; hands over (and forgets) the load durations since the last report."""
        s = self.stats
        if self.sender is not None:
            sent = self.sender.stats
            s.leases_issued, s.leases_expired, s.bytes_sent = sent.leases_issued, sent.leases_expired, sent.bytes_sent
        s.leases_held = self.num_leases
        report = TransferStats(**{f: getattr(s, f) for f in s.__struct_fields__})
        report.failures = dict(s.failures)
        s.new_durations = []
        return report

    def close(self) -> None:
        for half in (self.sender, self.receiver):
            if half is not None:
                half.close()
        self.ctx.term()
