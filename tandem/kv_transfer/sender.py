"""Prefill side, worker half: keeps finished prefills' blocks under leases and serves them to
decode workers, layer by layer, over a ZMQ ROUTER socket in a thread of the engine-core process.

NOTE (lease invariant): blocks are read only under ``_lock`` and only while their lease is live
(not released, deadline not passed). The core frees a lease's blocks only after ``take_ended``
removed the lease under the same lock, so a block is never read after its lease ended, and a
freed (possibly reused) block is never sent. A shared-memory grant (shm.py) extends the lease by
its full length first and tells the reader how long that holds.

Concurrent legs: a router may name the lease before the prefill runs (``expect``); a pull for it
(``Pull.pending``) is parked, with a PullWaiting keep-alive every half second, until the lease
exists (``hold``) or the prefill ends without one (``abandon``: PullError ``prefill_failed``). A
pull for a lease this worker never heard of is parked for ``PARK_GRACE_S`` at most (the pull may
overtake the prefill request on its way here). While the prefill runs, a parked TCP pull is
streamed the prompt's full blocks as each chunk completes them (``progress``), so the transfer
overlaps the prefill; the rest follows once the lease is held. A release for a lease that does
not exist yet (the decode leg was aborted first, perhaps before the prefill leg even arrived) is
remembered for ``FORGET_S`` and ends that lease the moment it is held.
NOTE (streaming invariant): a running prefill's blocks are read only under ``_lock`` while its
``_partial`` entry lists them; the core retracts the entry (``progress(.., [], 0)`` on preemption,
``abandon``, ``hold``) under the same lock before it frees or re-leases them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import msgspec
import torch
import zmq

from tandem.config import KVTransferConfig
from tandem.kv_transfer.shm import SharedKVRegion, host_id
from tandem.kv_transfer.wire import (
    KV_TRANSFER_CHANNEL,
    Doorbell,
    LayerData,
    Pull,
    PullDone,
    PullError,
    PullWaiting,
    Release,
    Renew,
    ShmGrant,
    ToSender,
    WireCodec,
    control_frame_cap,
)
from tandem.zmq_auth import release, require_secret

logger = logging.getLogger(__name__)

PARK_GRACE_S = 5.0  # a pending pull waits this long for a prefill this worker has not heard of
KEEPALIVE_S = 0.5  # PullWaiting to parked pulls this often (well below any transfer timeout)
FORGET_S = 60.0  # abandoned lease ids are remembered this long

# per layer: (K, V), or (K,) where V is K (MLA's latent); each [num_blocks, block_size, heads, dim]
KVCaches = list[tuple[torch.Tensor, ...]]


@dataclass
class Lease:
    lease_id: str
    block_ids: list[int]
    deadline: float
    prompt: str = ""  # hash of the prompt whose KV the blocks hold
    released: bool = False
    # shared-memory readers (ROUTER identity) -> until when their grant lets them read the blocks:
    # a Release from one reader must not free blocks another reader is still copying
    grants: dict[bytes, float] = field(default_factory=dict)
    issued: float = field(default_factory=time.monotonic)

    def live(self, now: float) -> bool:
        return not self.released and now < self.deadline

    def ended(self, now: float) -> bool:
        """No reader may touch the blocks any more: they may be freed."""
        return not self.live(now) and all(until <= now for until in self.grants.values())


@dataclass
class _Parked:
    """A pending pull waiting for its lease; ``sent`` of its blocks were streamed already."""
    ident: bytes
    pull: Pull
    since: float = field(default_factory=time.monotonic)
    sent: int = 0


@dataclass
class SenderStats:
    leases_issued: int = 0
    leases_released: int = 0  # the decode side confirmed
    leases_expired: int = 0  # no heartbeat, no confirmation: freed at the deadline
    pulls_served: int = 0
    shm_grants: int = 0  # pulls served by a shared-memory grant (a subset of pulls_served)
    streamed_blocks: int = 0  # blocks sent while their prefill was still running
    bytes_sent: int = 0  # by TCP, or granted for a shared-memory read


class KVSender:
    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, compat: str, ctx: zmq.Context,
                 region: SharedKVRegion | None = None) -> None:
        self.config, self.kv_caches, self.compat = config, kv_caches, compat
        self.device = kv_caches[0][0].device  # block indices go where the cache is
        self.region = region if config.transport == "auto" else None  # the caches are views of it
        self.codec = WireCodec(config.secret, ToSender)
        self.stats = SenderStats()
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._expected: set[str] = set()  # router-named leases whose prefill runs here now
        self._abandoned: dict[str, float] = {}  # ... whose prefill ended without a lease -> when
        # ... the decode side gave up before the lease existed -> when; kept FORGET_S, because its
        # release may even arrive before the prefill leg (expect) does
        self._released_early: dict[str, float] = {}
        self._partial: dict[str, tuple[list[int], int, str]] = {}  # ... running: (blocks, full ones, prompt)
        self._parked: dict[str, list[_Parked]] = {}  # sender thread only
        self._last_keepalive = 0.0
        self._bell = Doorbell(ctx, "kv-sender")  # rung by the core thread: a lease appeared or was abandoned
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at the high-water mark: never drop a layer
        # peers send only control messages, each within this (the connection of one that announces
        # a larger frame is dropped by ZMQ before any of it is buffered)
        self._sock.setsockopt(zmq.MAXMSGSIZE, control_frame_cap(kv_caches[0][0].shape[0]))
        # and only decode workers holding the fleet's secret connect at all: ZMQ caps frames, not
        # frames per message, so an open port could still be made to buffer many capped frames
        require_secret(self._sock, config.secret, KV_TRANSFER_CHANNEL)
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
    def expect(self, lease_id: str) -> None:
        """A prefill under a router-named lease id starts here; ValueError if the id is in use."""
        with self._lock:
            if lease_id in self._leases or lease_id in self._expected or lease_id in self._abandoned:
                raise ValueError(f"KV lease id {lease_id} is already in use")
            self._expected.add(lease_id)

    def hold(self, block_ids: list[int], prompt: str = "", lease_id: str | None = None) -> Lease:
        lease = Lease(lease_id or secrets.token_hex(16), list(block_ids), time.monotonic() + self.config.lease_s,
                      prompt)
        with self._lock:
            self._expected.discard(lease.lease_id)
            self._partial.pop(lease.lease_id, None)
            if self._released_early.pop(lease.lease_id, None) is not None:  # its decode leg already gave up
                lease.released = True
            self._leases[lease.lease_id] = lease
        self.stats.leases_issued += 1
        self._bell.ring()
        return lease

    def abandon(self, lease_id: str) -> None:
        """The prefill of an expected lease ended without one (aborted, failed)."""
        with self._lock:
            self._expected.discard(lease_id)
            self._released_early.pop(lease_id, None)
            self._partial.pop(lease_id, None)
            self._abandoned[lease_id] = time.monotonic()
        self._bell.ring()

    def progress(self, lease_id: str, block_ids: list[int], num_full: int, prompt: str) -> None:
        """The expected lease's prefill has computed its first ``num_full`` blocks (of
        ``block_ids``); 0 retracts them (preempted: the blocks are about to be freed)."""
        with self._lock:
            if lease_id not in self._expected:
                return
            if num_full <= 0:
                self._partial.pop(lease_id, None)
                return
            old = self._partial.get(lease_id)
            self._partial[lease_id] = (list(block_ids), num_full, prompt)
        if old is None or old[1] < num_full:
            self._bell.ring()

    def take_ended(self) -> list[str]:
        """Leases released by their decode worker or past their deadline, removed: their blocks
        may be freed now."""
        now = time.monotonic()
        with self._lock:
            for remembered in (self._abandoned, self._released_early):
                for lid in [lid for lid, t in remembered.items() if now - t > FORGET_S]:
                    del remembered[lid]
            ended = [lid for lid, lease in self._leases.items() if lease.ended(now)]
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
        release(self._sock)
        self._sock.close(0)
        self._bell.close()

    # -- sender thread -------------------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._bell.socket, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self._bell.socket in ready:
                self._bell.clear()
            if self._parked:
                self._service_parked()
            if self._sock not in ready:
                continue
            ident, *frames = self._sock.recv_multipart()
            if len(frames) != 2:  # [header, mac]: no message to the sender carries payload frames
                logger.warning("KV sender dropped a message of %d frames", len(frames))
                continue
            try:
                msg, _ = self.codec.decode(frames)  # verifies the MAC before decoding the header
            except PermissionError:
                self._reply_unauthenticated(ident, frames)
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("KV sender dropped a bad message: %s", e)
                continue
            try:
                self._handle(ident, msg)
            except Exception:
                logger.exception("KV sender failed on %s", type(msg).__name__)

    def _handle(self, ident: bytes, msg) -> None:
        if isinstance(msg, Pull):
            self._serve_pull(ident, msg)
        elif isinstance(msg, Renew):
            now = time.monotonic()
            with self._lock:
                for lid in msg.lease_ids:
                    lease = self._leases.get(lid)
                    if lease is not None and lease.live(now):
                        cap = lease.issued + self.config.max_hold_s  # heartbeats end here; pulls may not
                        lease.deadline = max(lease.deadline, min(now + self.config.lease_s, cap))
        elif isinstance(msg, Release):
            with self._lock:
                lease = self._leases.get(msg.lease_id)
                if lease is not None:
                    lease.released = True
                    lease.grants.pop(ident, None)  # this reader is done; others keep their grant
                elif msg.lease_id not in self._abandoned:  # expected, or its prefill leg not here yet
                    self._released_early[msg.lease_id] = time.monotonic()

    def _reply_unauthenticated(self, ident: bytes, frames: list) -> None:
        try:
            lease_id = msgspec.msgpack.decode(frames[0], type=Pull).lease_id
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError):
            return
        self._send(ident, PullError(lease_id, "unauthenticated", "request not signed with this fleet's secret"))

    def _send(self, ident: bytes, msg, payload: tuple = ()) -> None:
        self._sock.send_multipart([ident, *self.codec.encode(msg), *payload], copy=False)

    def _serve_pull(self, ident: bytes, pull: Pull, skip: int = 0, since: float | None = None) -> None:
        """Answer a pull; ``skip``: its first blocks were streamed already (send the rest);
        ``since``: when a parked pull arrived."""
        if pull.pending:
            resolved = self._resolve_pending(ident, pull, skip)
            if resolved is None:
                return
            pull = resolved
        error = self._check_pull(pull)
        if error is not None:
            self._send(ident, PullError(pull.lease_id, *error))
            return
        if self._grants_shm(pull) and not skip:
            self._grant_shm(ident, pull, 0.0 if since is None else time.monotonic() - since)
            return
        index = torch.tensor(pull.block_ids[skip:], dtype=torch.int64, device=self.device)
        for layer, caches in enumerate(self.kv_caches):
            with self._lock:  # see the lease invariant in the module docstring
                lease = self._leases.get(pull.lease_id)
                if lease is None or not lease.live(time.monotonic()):
                    self._send(ident, PullError(pull.lease_id, "lease_expired", "lease ended during the transfer"))
                    return
                lease.deadline = max(lease.deadline, time.monotonic() + self.config.lease_s)
                tensors = [c.index_select(0, index).cpu() for c in caches]
            self._send_layer(ident, pull.lease_id, layer, tensors, skip)
        self._send(ident, PullDone(pull.lease_id, len(self.kv_caches)))
        self.stats.pulls_served += 1

    def _send_layer(self, ident: bytes, lease_id: str, layer: int, tensors: list[torch.Tensor],
                    first_block: int) -> None:
        """One frame per tensor of the layer (K and V, or the one latent), each ``nbytes``."""
        nbytes = tensors[0].numel() * tensors[0].element_size()
        header = LayerData(lease_id, layer, tensors[0].shape[0], nbytes, first_block)
        self._send(ident, header, tuple(t.view(torch.uint8).numpy() for t in tensors))
        self.stats.bytes_sent += len(tensors) * nbytes

    def _grants_shm(self, pull: Pull) -> bool:
        return self.region is not None and bool(pull.host) and pull.host == host_id()

    def _resolve_pending(self, ident: bytes, pull: Pull, sent: int = 0) -> Pull | None:
        """A pending pull with the lease's block ids in place of its indices; None when it was
        parked (no lease yet) or answered with an error."""
        with self._lock:
            lease = self._leases.get(pull.lease_id)
        if lease is None:
            self._parked.setdefault(pull.lease_id, []).append(_Parked(ident, pull, sent=sent))
            return None
        if lease.prompt != pull.prompt:
            self._send(ident, PullError(pull.lease_id, "prefill_failed", "the prefill computed another prompt"))
            return None
        if any(not 0 <= i < len(lease.block_ids) for i in pull.block_ids):
            self._send(ident, PullError(pull.lease_id, "bad_blocks", "block index outside the lease"))
            return None
        return msgspec.structs.replace(pull, block_ids=[lease.block_ids[i] for i in pull.block_ids], pending=False)


    def _service_parked(self) -> None:
        """Serve parked pulls whose lease now exists; fail those whose prefill will not come."""
        now = time.monotonic()
        keepalive = now - self._last_keepalive >= KEEPALIVE_S
        if keepalive:
            self._last_keepalive = now
        for lid in list(self._parked):
            with self._lock:
                exists, abandoned, expected = lid in self._leases, lid in self._abandoned, lid in self._expected
            waiters = self._parked[lid]
            if exists or abandoned or (not expected and now - waiters[0].since > PARK_GRACE_S):
                del self._parked[lid]
                for w in waiters:
                    if exists:
                        self._guarded(w, lambda w=w: self._serve_pull(w.ident, w.pull, w.sent, w.since))
                    else:
                        self._send(w.ident, PullError(lid, "prefill_failed", "the prefill for this lease did not "
                                                      "finish here" if abandoned else "no such prefill arrived here"))
                continue
            for w in waiters:
                if not self._guarded(w, lambda w=w: self._stream(w)) and keepalive:
                    self._send(w.ident, PullWaiting(lid))

    def _guarded(self, w: _Parked, serve) -> bool:
        """``serve()``; an exception fails that pull (the decode side hears why), not the sender."""
        try:
            return bool(serve())
        except Exception as e:
            logger.exception("KV sender failed on a parked pull for %s", w.pull.lease_id)
            self._send(w.ident, PullError(w.pull.lease_id, "internal", str(e)))
            return True

    def _stream(self, w: _Parked) -> bool:
        """Send a parked TCP pull the blocks its running prefill has completed since the last
        time; True when something was sent."""
        pull = w.pull
        if self._grants_shm(pull):
            return False  # one shared-memory grant once the lease exists beats several rounds
        with self._lock:  # see the streaming invariant in the module docstring
            partial = self._partial.get(pull.lease_id)
            if partial is None or partial[2] != pull.prompt:
                return False
            block_ids, num_full, _ = partial
            ready = 0
            for i in pull.block_ids[w.sent:]:
                if i >= num_full or i >= len(block_ids):
                    break
                ready += 1
            if not ready:
                return False
            index = torch.tensor([block_ids[i] for i in pull.block_ids[w.sent:w.sent + ready]], dtype=torch.int64,
                                 device=self.device)
            layers = [[c.index_select(0, index).cpu() for c in caches] for caches in self.kv_caches]
        for layer, tensors in enumerate(layers):
            self._send_layer(w.ident, pull.lease_id, layer, tensors, w.sent)
        w.sent += ready
        self.stats.streamed_blocks += ready
        return True

    def _grant_shm(self, ident: bytes, pull: Pull, held_s: float = 0.0) -> None:
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(pull.lease_id)
            if lease is None or not lease.live(now):
                self._send(ident, PullError(pull.lease_id, "lease_expired", "lease ended before the pull"))
                return
            lease.deadline = max(lease.deadline, now + self.config.lease_s)
            lease.grants[ident] = lease.deadline
            valid_s = lease.deadline - now
        region, k_cache = self.region, self.kv_caches[0][0]
        assert region is not None  # shared memory is granted only by a sender that has a region
        grant = ShmGrant(pull.lease_id, region.pid, region.fd, region.token, region.nbytes, k_cache.shape[0], valid_s,
                         pull.block_ids, held_s)
        self._send(ident, grant)
        self.stats.pulls_served += 1
        self.stats.shm_grants += 1
        self.stats.bytes_sent += len(pull.block_ids) * sum(len(caches) * caches[0][0].numel() * caches[0].element_size()
                                                           for caches in self.kv_caches)

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
