"""The offload worker: one thread that moves block bytes between the device KV cache, the host
tier's rows and the disk tier's files, in the order jobs were queued (FIFO; ``tiers.py`` relies on
it). It decides nothing: the core thread chose every slot, file and block before queueing."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tandem.kv_offload import disk
from tandem.utils import drain

logger = logging.getLogger(__name__)

# per layer: (K, V), or (K,) where V is K (MLA's latent); each [num_blocks, block_size, heads, dim]
KVCaches = list[tuple[torch.Tensor, ...]]


class BlockLayout:
    """One block over every layer as one row of bytes: layer 0 K, layer 0 V, layer 1 K, ..."""

    def __init__(self, kv_caches: KVCaches) -> None:
        # uint8 views [num_blocks, bytes_per_block_of_that_tensor] (raw bytes: FP8 layers too)
        self.views = [c.view(torch.uint8).view(c.shape[0], -1) for layer in kv_caches for c in layer]
        self.offsets: list[int] = []
        total = 0
        for v in self.views:
            self.offsets.append(total)
            total += v.shape[1]
        self.bytes_per_block = total
        self.device = self.views[0].device
        self.numpy_views = [v.numpy() for v in self.views] if self.device.type == "cpu" else []


@dataclass
class StoreJob:
    job_id: int
    block_ids: list[int]  # device blocks, held by the connector until the result
    slots: list[int]  # host rows, one per block
    disk_writes: list[tuple[int, bytes, list[int]]] = field(default_factory=list)  # (index in block_ids, hash, tokens)
    disk_deletes: list[bytes] = field(default_factory=list)  # hashes whose files go first


@dataclass
class LoadJob:
    job_id: int
    block_ids: list[int]  # device blocks to fill
    sources: list[tuple[str, int | bytes]]  # per block: ("CPU", slot) or ("DISK", hash)
    promote: list[tuple[int, int]] = field(default_factory=list)  # (index, host slot): disk blocks kept on host too


@dataclass
class JobResult:
    job_id: int
    ok: bool
    num_bytes: int
    seconds: float
    error: str | None = None
    corrupt: list[bytes] = field(default_factory=list)  # disk blocks found corrupt (their files are gone)
    written: list[bytes] = field(default_factory=list)  # disk blocks written
    unwritten: list[bytes] = field(default_factory=list)  # disk writes that failed


class OffloadWorker:
    def __init__(self, layout: BlockLayout, host: torch.Tensor, disk_root: Path | None, compat: str) -> None:
        self.layout, self.host, self.disk_root, self.compat = layout, host, disk_root, compat
        self._jobs: queue.SimpleQueue[StoreJob | LoadJob | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[JobResult] = queue.SimpleQueue()
        self.result_ready = threading.Event()
        self._stream = torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="tandem-kv-offload", daemon=True)
        self._thread.start()

    def submit(self, job: StoreJob | LoadJob) -> None:
        if self._stream is not None:  # the copies start after every kernel queued so far
            event = torch.cuda.Event()
            event.record()
            job.ready_event = event  # type: ignore[union-attr]
        self._jobs.put(job)

    def take_results(self) -> list[JobResult]:
        self.result_ready.clear()
        return drain(self._results)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (job := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                result = self._store(job) if isinstance(job, StoreJob) else self._load(job)
            except Exception as e:  # NOTE: every job gets exactly one result
                logger.exception("KV offload job %d failed", job.job_id)
                result = JobResult(job.job_id, False, 0, 0.0, error=f"{type(e).__name__}: {e}")
            result.seconds = time.perf_counter() - start
            self._results.put(result)
            self.result_ready.set()

    # NOTE: on a CPU the copies go through numpy (one thread, no OpenMP team of its own), so the
    # offload thread never competes with the model's intra-op threads beyond the bytes it moves
    def _device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        if self._stream is None:
            host, ids, rows = self.host.numpy(), np.asarray(block_ids), np.asarray(slots)
            for view, off in zip(self.layout.numpy_views, self.layout.offsets):
                host[rows, off:off + view.shape[1]] = view[ids]
            return
        ids_t, slots_t = torch.tensor(block_ids, device=self.layout.device), torch.tensor(slots)
        with torch.cuda.stream(self._stream):
            for view_t, off in zip(self.layout.views, self.layout.offsets):
                self.host[slots_t, off:off + view_t.shape[1]] = view_t.index_select(0, ids_t).to("cpu")
        self._stream.synchronize()

    def _staging_to_device(self, block_ids: list[int], staging: torch.Tensor) -> None:
        if self._stream is None:
            rows, ids = staging.numpy(), np.asarray(block_ids)
            for view, off in zip(self.layout.numpy_views, self.layout.offsets):
                view[ids] = rows[:, off:off + view.shape[1]]
            return
        ids_t = torch.tensor(block_ids, device=self.layout.device)
        with torch.cuda.stream(self._stream):
            for view_t, off in zip(self.layout.views, self.layout.offsets):
                view_t.index_copy_(0, ids_t, staging[:, off:off + view_t.shape[1]].to(self.layout.device))
        self._stream.synchronize()

    def _sync_start(self, job: StoreJob | LoadJob) -> None:
        event = getattr(job, "ready_event", None)
        if event is not None and self._stream is not None:
            self._stream.wait_event(event)

    def _store(self, job: StoreJob) -> JobResult:
        result = JobResult(job.job_id, True, len(job.block_ids) * self.layout.bytes_per_block, 0.0)
        if self.disk_root is not None:  # evicted files go first, whatever happens to the copy
            for block_hash in job.disk_deletes:
                try:
                    disk.block_path(self.disk_root, block_hash).unlink(missing_ok=True)
                except OSError as e:
                    logger.warning("KV disk tier: cannot delete block %s: %s", block_hash.hex()[:12], e)
        try:
            self._sync_start(job)
            self._device_to_host(job.block_ids, job.slots)
        except Exception as e:  # NOTE: the result still says which files were deleted (none written)
            logger.exception("KV offload store %d failed", job.job_id)
            result.ok, result.error = False, f"{type(e).__name__}: {e}"
            result.unwritten = [h for _, h, _ in job.disk_writes]
            return result
        if self.disk_root is not None:
            for i, block_hash, token_ids in job.disk_writes:
                try:
                    disk.write_block(self.disk_root, self.compat, block_hash, token_ids,
                                     self.host[job.slots[i]].numpy().data)
                    result.written.append(block_hash)
                except OSError as e:
                    logger.warning("KV disk tier: cannot write block %s: %s", block_hash.hex()[:12], e)
                    result.unwritten.append(block_hash)
        return result

    def _load(self, job: LoadJob) -> JobResult:
        self._sync_start(job)
        n, width = len(job.block_ids), self.layout.bytes_per_block
        staging = torch.empty((n, width), dtype=torch.uint8)
        result = JobResult(job.job_id, True, n * width, 0.0)
        host_rows = [(i, s) for i, (medium, s) in enumerate(job.sources) if medium == "CPU"]
        if host_rows:
            staging.numpy()[[i for i, _ in host_rows]] = self.host.numpy()[[int(s) for _, s in host_rows]]
        for i, (medium, block_hash) in enumerate(job.sources):
            if medium != "DISK":
                continue
            assert self.disk_root is not None and isinstance(block_hash, bytes)
            path = disk.block_path(self.disk_root, block_hash)
            try:
                staging[i] = torch.frombuffer(bytearray(disk.read_block(path, self.compat, block_hash, width)),
                                              dtype=torch.uint8)
            except (OSError, disk.CorruptBlockFile) as e:
                logger.warning("KV disk tier: not loading %s: %s (the prompt is recomputed)", path, e)
                path.unlink(missing_ok=True)
                result.corrupt.append(block_hash)
        if result.corrupt:
            result.ok, result.error = False, f"{len(result.corrupt)} disk block(s) unreadable"
            return result
        for i, slot in job.promote:
            self.host[slot] = staging[i]
        self._staging_to_device(job.block_ids, staging)
        return result


def host_rows(num_blocks: int, layout: BlockLayout) -> torch.Tensor:
    """The host tier's storage: one row of bytes per block (pinned when the cache is on a GPU)."""
    pin = layout.device.type == "cuda"
    return torch.zeros((num_blocks, layout.bytes_per_block), dtype=torch.uint8, pin_memory=pin)


