"""Prefill side, worker half: keeps finished prefills' blocks under leases and serves them to
decode workers, layer by layer, over a ZMQ ROUTER socket in a thread of the engine-core process.

NOTE (lease invariant): blocks are read only under ``_lock`` and only while their lease is live
(not released, deadline not passed). The core frees a lease's blocks only after ``take_ended``
removed the lease under the same lock, so a block is never read after its lease ended, and a
freed (possibly reused) block is never sent. A shared-memory grant (shm.py) extends the lease by
its full length first and tells the reader how long that holds.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

import msgspec
import torch
import zmq

from tandem.kv_transfer.shm import SharedKVRegion, host_id
from tandem.kv_transfer.ticket import KVTransferConfig
from tandem.kv_transfer.wire import (MAX_FRAME_BYTES, LayerData, Pull, PullDone, PullError, Release, Renew,
                                     ShmGrant, ToSender, WireCodec)

logger = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (K, V), [num_blocks, block_size, heads, dim]


@dataclass
class Lease:
    lease_id: str
    block_ids: list[int]
    deadline: float
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and now < self.deadline


@dataclass
class SenderStats:
    leases_issued: int = 0
    leases_released: int = 0  # the decode side confirmed
    leases_expired: int = 0  # no heartbeat, no confirmation: freed at the deadline
    pulls_served: int = 0
    shm_grants: int = 0  # pulls served by a shared-memory grant (a subset of pulls_served)
    bytes_sent: int = 0  # by TCP, or granted for a shared-memory read


class KVSender:
    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, compat: str, ctx: zmq.Context,
                 region: SharedKVRegion | None = None) -> None:
        self.config, self.kv_caches, self.compat = config, kv_caches, compat
        self.region = region if config.transport == "auto" else None  # the caches are views of it
        self.codec = WireCodec(config.secret, ToSender)
        self.stats = SenderStats()
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at the high-water mark: never drop a layer
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        base = f"tcp://{config.host}"
        port = self._sock.bind_to_random_port(base) if config.port == 0 else self._bind(base, config.port)
        self.endpoint = f"{base}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-sender", daemon=True)
        self._thread.start()

    def _bind(self, base: str, port: int) -> int:
        self._sock.bind(f"{base}:{port}")
        return port

    # -- core thread -------------------------------------------------------------------------------------
    def hold(self, block_ids: list[int]) -> Lease:
        lease = Lease(secrets.token_hex(16), list(block_ids), time.monotonic() + self.config.lease_s)
        with self._lock:
            self._leases[lease.lease_id] = lease
        self.stats.leases_issued += 1
        return lease

    def take_ended(self) -> list[str]:
        """Leases released by their decode worker or past their deadline, removed: their blocks
        may be freed now."""
        now = time.monotonic()
        with self._lock:
            ended = [lid for lid, lease in self._leases.items() if not lease.live(now)]
            for lid in ended:
                lease = self._leases.pop(lid)
                if lease.released:
                    self.stats.leases_released += 1
                else:
                    self.stats.leases_expired += 1
                    logger.warning("KV lease %s expired without confirmation; blocks freed", lid)
        return ended

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)

    # -- sender thread -------------------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            ident, *frames = self._sock.recv_multipart()
            try:
                msg, _ = self.codec.decode(frames)
            except PermissionError:
                self._reply_unauthenticated(ident, frames)
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("KV sender dropped a bad message: %s", e)
                continue
            try:
                self._handle(ident, msg)
            except Exception:  # noqa: BLE001 - one bad pull must not stop the sender
                logger.exception("KV sender failed on %s", type(msg).__name__)

    def _handle(self, ident: bytes, msg) -> None:
        if isinstance(msg, Pull):
            self._serve_pull(ident, msg)
        elif isinstance(msg, Renew):
            deadline = time.monotonic() + self.config.lease_s
            with self._lock:
                for lid in msg.lease_ids:
                    lease = self._leases.get(lid)
                    if lease is not None and lease.live(time.monotonic()):
                        lease.deadline = deadline
        elif isinstance(msg, Release):
            with self._lock:
                lease = self._leases.get(msg.lease_id)
                if lease is not None:
                    lease.released = True

    def _reply_unauthenticated(self, ident: bytes, frames: list) -> None:
        try:
            lease_id = msgspec.msgpack.decode(frames[0], type=Pull).lease_id
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError):
            return
        self._send(ident, PullError(lease_id, "unauthenticated", "request not signed with this fleet's secret"))

    def _send(self, ident: bytes, msg, payload: tuple = ()) -> None:
        self._sock.send_multipart([ident, *self.codec.encode(msg), *payload], copy=False)

    def _serve_pull(self, ident: bytes, pull: Pull) -> None:
        error = self._check_pull(pull)
        if error is not None:
            self._send(ident, PullError(pull.lease_id, *error))
            return
        if self.region is not None and pull.host and pull.host == host_id():
            self._grant_shm(ident, pull)
            return
        index = torch.tensor(pull.block_ids, dtype=torch.int64)
        for layer, (k_cache, v_cache) in enumerate(self.kv_caches):
            with self._lock:  # see the lease invariant in the module docstring
                lease = self._leases.get(pull.lease_id)
                if lease is None or not lease.live(time.monotonic()):
                    self._send(ident, PullError(pull.lease_id, "lease_expired", "lease ended during the transfer"))
                    return
                lease.deadline = max(lease.deadline, time.monotonic() + self.config.lease_s)
                k = k_cache.index_select(0, index).cpu()
                v = v_cache.index_select(0, index).cpu()
            nbytes = k.numel() * k.element_size()
            header = LayerData(pull.lease_id, layer, len(pull.block_ids), nbytes)
            self._send(ident, header, (k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()))
            self.stats.bytes_sent += 2 * nbytes
        self._send(ident, PullDone(pull.lease_id, len(self.kv_caches)))
        self.stats.pulls_served += 1

    def _grant_shm(self, ident: bytes, pull: Pull) -> None:
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(pull.lease_id)
            if lease is None or not lease.live(now):
                self._send(ident, PullError(pull.lease_id, "lease_expired", "lease ended before the pull"))
                return
            lease.deadline = max(lease.deadline, now + self.config.lease_s)
            valid_s = lease.deadline - now
        region, k_cache = self.region, self.kv_caches[0][0]
        grant = ShmGrant(pull.lease_id, region.pid, region.fd, region.token, region.nbytes, k_cache.shape[0], valid_s)
        self._send(ident, grant)
        self.stats.pulls_served += 1
        self.stats.shm_grants += 1
        self.stats.bytes_sent += 2 * len(self.kv_caches) * len(pull.block_ids) * k_cache[0].numel() * k_cache.element_size()

    def _check_pull(self, pull: Pull) -> tuple[str, str] | None:
        if pull.compat != self.compat:
            return "incompatible", "model, dtype, block size or KV layout differ between the workers"
        with self._lock:
            lease = self._leases.get(pull.lease_id)
            if lease is None:
                return "unknown_lease", "no such lease (never issued, or already freed)"
            if not lease.live(time.monotonic()):
                return "lease_expired", "lease ended before the pull"
            if not set(pull.block_ids) <= set(lease.block_ids):
                return "bad_blocks", "asked for blocks outside the lease"
        return None
