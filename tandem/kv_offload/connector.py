"""KV offloading as the scheduler sees it: a host (CPU) tier, and a disk tier under it, behind the
connector hooks of ``tandem.kv_transfer.base``.

- Save: when a request ends, its cached (full, computed) blocks that the host tier lacks are copied
  there by the worker thread; the connector holds the blocks until the copy ended (they stay in the
  device prefix cache meanwhile), then hands them back through ``take_finished``. With a disk tier
  each saved block is also written to a file (write-through), so it survives a restart.
- Load: on a waiting request's prefix miss in the device pool, the blocks that follow the device
  hit are looked up by hash in the host tier, then on disk; the leading run found is loaded into
  newly allocated device blocks by the worker while the request waits (WAITING_FOR_REMOTE_KVS),
  and admitted like a prefix hit when the load ends. A load that fails (a corrupt file) falls back
  to computing the prompt. Blocks read from disk are kept in the host tier too.
- The core thread owns all bookkeeping (``tiers.TierIndex``); the worker only copies (``worker.py``).
NOTE: a request that reuses nothing costs the step nothing here: the lookup is a dict probe per
block after the device hit, and saving is a queued copy in another thread.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from tandem.config import KVOffloadConfig
from tandem.kv_offload import disk
from tandem.kv_offload.stats import OffloadStats
from tandem.kv_offload.tiers import TierEntry, TierIndex
from tandem.kv_offload.worker import BlockLayout, JobResult, KVCaches, LoadJob, OffloadWorker, StoreJob, host_rows
from tandem.kv_transfer.base import FinishedTransfer, KVConnectorBase, TierChange, load_key, refuse_kv_transfer

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVCacheBlock
    from tandem.engine.request import Request

logger = logging.getLogger(__name__)

CPU, DISK = "CPU", "DISK"


@dataclass
class _Job:
    """What to apply when a job's result arrives."""
    blocks: list[KVCacheBlock] = field(default_factory=list)  # device blocks held until then
    request: Request | None = None  # a load: the request waiting for it (None once aborted)
    host_new: list[bytes] = field(default_factory=list)  # host entries this job fills
    disk_new: list[bytes] = field(default_factory=list)  # disk entries this job writes
    pinned: list[tuple[str, bytes, TierEntry]] = field(default_factory=list)  # (medium, hash, entry) this load reads
    hit_tokens: dict[str, int] = field(default_factory=dict)


class OffloadingConnector(KVConnectorBase):
    def __init__(self, config: KVOffloadConfig, kv_caches: KVCaches, compat: str, block_size: int) -> None:
        self.block_size = block_size
        layout = BlockLayout(kv_caches)
        self.bytes_per_block = layout.bytes_per_block
        num_host = config.host_bytes // layout.bytes_per_block
        if num_host < 1:
            raise ValueError(f"kv_offloading_size holds no KV block ({layout.bytes_per_block} bytes each)")
        self.host = TierIndex(num_host, slots=True)
        self.disk: TierIndex | None = None
        disk_root = None
        self._changes: list[TierChange] = []
        self.stats = OffloadStats(host_blocks_total=num_host)
        if config.disk_path is not None:
            disk_root = Path(config.disk_path)
            disk_root.mkdir(parents=True, exist_ok=True)
            self.disk = TierIndex(max(1, config.disk_bytes // layout.bytes_per_block), slots=False)
            self.stats.disk_blocks_total = self.disk.capacity
            self._restore_disk(disk_root, compat)
        self.worker = OffloadWorker(layout, host_rows(num_host, layout), disk_root, compat)
        self._ids = itertools.count()
        self._jobs: dict[int, _Job] = {}
        self._loading: dict[str, Request] = {}
        self._load_of: dict[str, int] = {}  # request id -> its load job
        self._no_tier_load: set[str] = set()  # requests (load_key) whose tier load failed: computed instead
        logger.info("KV offloading: host tier %d blocks (%.2f GiB)%s", num_host,
                    num_host * layout.bytes_per_block / 2**30,
                    f", disk tier {self.disk.capacity} blocks in {disk_root} ({len(self.disk)} found)"
                    if self.disk is not None else "")

    def _restore_disk(self, root: Path, compat: str) -> None:
        assert self.disk is not None
        found, skipped = disk.scan(root, compat, self.bytes_per_block)
        self.stats.corrupt_files += skipped
        for extra in found[: max(0, len(found) - self.disk.capacity)]:  # over a smaller kv_disk_size
            disk.block_path(root, extra.block_hash).unlink(missing_ok=True)
        kept = found[max(0, len(found) - self.disk.capacity):]
        for block in kept:
            self.disk.add_ready(block.block_hash, block.token_ids)
        if kept:
            self._changes.append(TierChange(DISK, True, [(b.block_hash, tuple(b.token_ids)) for b in kept]))

    # -- scheduler-side hooks ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        refuse_kv_transfer(request)

    def _find(self, block_hash: bytes, token_ids: list[int]) -> tuple[str, TierEntry] | None:
        entry = self.host.lookup(block_hash, token_ids)
        if entry is not None:
            return CPU, entry
        entry = self.disk.lookup(block_hash, token_ids) if self.disk is not None else None
        return (DISK, entry) if entry is not None else None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.wants_prompt_logprobs or load_key(request) in self._no_tier_load:
            return 0, False
        bs = self.block_size
        first, last = num_computed_tokens // bs, (request.num_prompt_tokens - 1) // bs
        n = 0
        for i in range(first, min(last, len(request.block_hashes))):
            if self._find(request.block_hashes[i], request.all_token_ids[i * bs:(i + 1) * bs]) is None:
                break
            n += 1
        return n * bs, n > 0

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        if not num_external_tokens:
            return
        bs = self.block_size
        first, count = request.num_computed_tokens // bs, num_external_tokens // bs
        job_id, job = next(self._ids), _Job(request=request)
        load = LoadJob(job_id, block_ids[first:first + count], [])
        found = []
        # NOTE: pin every source before any host slot is taken for a disk block, so that taking
        # one can never evict a source this load still has to read
        for i in range(first, first + count):
            block_hash, tokens = request.block_hashes[i], request.all_token_ids[i * bs:(i + 1) * bs]
            hit = self._find(block_hash, tokens)
            assert hit is not None, "a block found by get_num_new_matched_tokens is kept until its load"
            medium, entry = hit
            entry.pins += 1
            job.pinned.append((medium, block_hash, entry))
            job.hit_tokens[medium] = job.hit_tokens.get(medium, 0) + bs
            load.sources.append((medium, entry.location if medium == CPU else block_hash))
            found.append((medium, block_hash, tokens))
        for k, (medium, block_hash, tokens) in enumerate(found):
            if medium == DISK and block_hash not in self.host:
                slot = self._host_slot(block_hash, tokens)
                if slot is not None:
                    load.promote.append((k, slot))
                    job.host_new.append(block_hash)
        self._jobs[job_id] = job
        self._loading[request.request_id] = request
        self._load_of[request.request_id] = job_id
        self.worker.submit(load)

    def _host_slot(self, block_hash: bytes, token_ids: list[int]) -> int | None:
        entry, evicted = self.host.add(block_hash, token_ids)
        if evicted:
            self._changes.append(TierChange(CPU, False, [(h, e.token_ids) for h, e in evicted]))
        return entry.location if entry is not None else None

    def request_finished(self, request: Request, blocks: list[KVCacheBlock]) -> tuple[bool, dict | None]:
        self._no_tier_load.discard(load_key(request))
        rid = request.request_id
        if self._loading.get(rid) is request:  # aborted mid-load: its blocks wait for the load's end
            del self._loading[rid]
            job = self._jobs[self._load_of.pop(rid)]
            job.request, job.blocks = None, blocks
            return True, None
        return self._save(blocks), None

    def _save(self, blocks: list[KVCacheBlock]) -> bool:
        """Queue a copy of the cached blocks the host tier lacks; True when it holds ``blocks``."""
        job_id, job = next(self._ids), _Job(blocks=blocks)
        store = StoreJob(job_id, [], [])
        for block in blocks:
            block_hash, tokens = block.block_hash, block.token_ids
            if block_hash is None or tokens is None or block_hash in self.host:
                continue
            slot = self._host_slot(block_hash, list(tokens))
            if slot is None:
                break  # every host block is being read or written: save the rest another time
            store.block_ids.append(block.block_id)
            store.slots.append(slot)
            job.host_new.append(block_hash)
            if self.disk is not None and block_hash not in self.disk:
                entry, evicted = self.disk.add(block_hash, list(tokens))
                if evicted:
                    store.disk_deletes.extend(h for h, _ in evicted)
                    self._changes.append(TierChange(DISK, False, [(h, e.token_ids) for h, e in evicted]))
                if entry is not None:
                    store.disk_writes.append((len(store.slots) - 1, block_hash, list(tokens)))
                    job.disk_new.append(block_hash)
        if not store.block_ids:
            return False
        self._jobs[job_id] = job
        self.worker.submit(store)
        return True

    def take_finished(self) -> list[FinishedTransfer]:
        done = []
        for result in self.worker.take_results():
            job = self._jobs.pop(result.job_id)
            if job.pinned:
                done.append(self._apply_load(job, result))
            else:
                self._apply_store(job, result)
                done.append(FinishedTransfer(free=job.blocks))
        return done

    def _apply_store(self, job: _Job, result: JobResult) -> None:
        self._settle(self.host, CPU, job.host_new, result.ok)
        if self.disk is not None:
            self._settle(self.disk, DISK, [h for h in job.disk_new if h in result.written], True)
            self._settle(self.disk, DISK, [h for h in job.disk_new if h not in result.written], False)
        if result.ok:
            s = self.stats
            s.stored_blocks += len(job.host_new)
            s.stored_bytes += result.num_bytes
            s.store_seconds += result.seconds
            s.disk_written_blocks += len(result.written)

    def _apply_load(self, job: _Job, result: JobResult) -> FinishedTransfer:
        for _, _, entry in job.pinned:
            entry.pins -= 1
        if result.corrupt and self.disk is not None:
            self.stats.corrupt_files += len(result.corrupt)
            gone = []
            for medium, block_hash, entry in job.pinned:
                # only the entry this load read, and only once no other load reads it
                if (medium == DISK and block_hash in result.corrupt and entry.pins == 0
                        and self.disk.entries.get(block_hash) is entry):
                    self.disk.remove(block_hash)
                    gone.append((block_hash, entry.token_ids))
            self._changes.append(TierChange(DISK, False, gone))
        self._settle(self.host, CPU, job.host_new, result.ok)
        req = job.request
        if req is None:  # aborted while loading
            return FinishedTransfer(free=job.blocks)
        del self._loading[req.request_id]
        self._load_of.pop(req.request_id, None)
        s = self.stats
        if not result.ok:
            s.loads_failed += 1
            self._no_tier_load.add(load_key(req))  # computed here instead, never loaded again
            return FinishedTransfer(request=req)
        for medium, tokens in job.hit_tokens.items():
            s.hit_tokens[medium] = s.hit_tokens.get(medium, 0) + tokens
        s.loaded_bytes += result.num_bytes
        s.load_seconds += result.seconds
        return FinishedTransfer(request=req, ok=True, cached=True)

    def _settle(self, tier: TierIndex, medium: str, hashes: list[bytes], ok: bool) -> None:
        """A job that filled these pending entries ended: ready (announced), or forgotten."""
        changed = []
        for block_hash in hashes:
            entry = tier.entries.get(block_hash)
            if entry is None:
                continue
            if ok:
                entry.ready = True
                changed.append((block_hash, entry.token_ids))
            else:
                tier.remove(block_hash)
        if changed:
            self._changes.append(TierChange(medium, True, changed))

    def wait(self, timeout_s: float) -> None:
        self.worker.result_ready.wait(timeout_s)

    def has_pending(self) -> bool:
        return bool(self._jobs)

    def offload_busy(self) -> bool:
        return bool(self._jobs)

    @property
    def loading(self) -> Mapping[str, Request]:
        return MappingProxyType(self._loading)

    def transfer_state(self) -> tuple:
        return len(self._jobs), len(self.host), len(self.disk) if self.disk is not None else 0

    def take_tier_changes(self) -> list[TierChange]:
        changes, self._changes = self._changes, []
        return changes

    def offload_report(self) -> OffloadStats:
        s = self.stats
        s.host_blocks_used = len(self.host)
        s.disk_blocks_used = len(self.disk) if self.disk is not None else 0
        report = OffloadStats(**{f: getattr(s, f) for f in s.__struct_fields__})
        report.hit_tokens = dict(s.hit_tokens)
        return report

    def check_idle(self) -> None:
        assert not self._jobs and not self._loading and not self._no_tier_load, "KV offload jobs still queued"
        self.host.check_idle()
        if self.disk is not None:
            self.disk.check_idle()

    def close(self) -> None:
        self.worker.close()
