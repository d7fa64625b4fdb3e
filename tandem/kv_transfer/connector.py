"""The KV connector as the scheduler sees it: one object per engine core with a sending half
(prefill: leases and a ROUTER serving pulls) and a receiving half (decode: pulls and heartbeats).

The scheduler plans (which blocks to load, when a finished prefill's blocks may be freed); the
halves move bytes in their own threads. Everything here is called from the core thread.
"""

from __future__ import annotations

import zmq

from tandem.engine.protocol import TransferStats
from tandem.kv_transfer.receiver import KVReceiver, LoadResult
from tandem.kv_transfer.sender import KVCaches, KVSender
from tandem.kv_transfer.shm import SharedKVRegion
from tandem.kv_transfer.ticket import KVTransferConfig, Ticket, prompt_hash, sign


class KVConnector:
    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, compat: str, block_size: int,
                 kv_bytes_per_token: int, region: SharedKVRegion | None = None) -> None:
        self.config, self.compat = config, compat
        self.block_size, self.kv_bytes_per_token = block_size, kv_bytes_per_token
        self.ctx = zmq.Context()
        self.sender = KVSender(config, kv_caches, compat, self.ctx, region) if config.sends else None
        self.receiver = KVReceiver(config, kv_caches, compat, self.ctx) if config.receives else None
        self.stats = TransferStats()
        self._prompts: dict[str, str] = {}  # expected lease id -> prompt hash, while its prefill runs

    @property
    def failure_policy(self) -> str:
        return self.config.failure_policy

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

    def progress(self, lease_id: str, prompt_token_ids: list[int], block_ids: list[int], num_full: int) -> None:
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
