"""Decode side, worker half: pulls leased blocks from prefill workers into this worker's KV cache,
in a thread of the engine-core process, and keeps the leases of waiting requests alive.

Commands come from the core thread through a queue; results go back through another. Every
started load produces exactly one LoadResult (ok, failed or cancelled), and only after the last
write into its blocks: the scheduler frees a load's blocks only once its result is in.

On one host (transport auto) a pull asks for a shared-memory grant and the copy is done here, from
a read-only mapping of the prefill worker's cache (shm.py); where the mapping cannot be opened the
same load is pulled again over TCP, and that endpoint is not asked for shared memory again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from tandem.config import KVTransferConfig
from tandem.kv_transfer.sender import KVCaches
from tandem.kv_transfer.shm import RemoteRegion, host_id, kv_region_layout
from tandem.kv_transfer.ticket import Ticket
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
    ToReceiver,
    WireCodec,
    data_frame_cap,
)
from tandem.utils import drain
from tandem.zmq_auth import present_secret

logger = logging.getLogger(__name__)

# Received frames are read-only buffers; we only read from them (index_copy_ into the cache).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

_POLL_MS = 20


@dataclass
class LoadResult:
    request_id: str
    ok: bool
    kind: str = ""  # on failure: timeout | cancelled | unknown_lease | lease_expired | incompatible | ...
    message: str = ""
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str = "tcp"  # tcp | shm


@dataclass
class _Load:
    request_id: str
    ticket: Ticket
    remote_block_ids: list[int]
    local_index: torch.Tensor
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    pull_sent: float = 0.0
    written: int = 0  # (layer, block) pieces written; complete at num_layers x blocks
    num_bytes: int = 0


def _copy_blocks(cache: torch.Tensor, index: torch.Tensor, blocks: torch.Tensor) -> None:
    """cache[index] = blocks, as raw bytes (any cache dtype: CPU index_copy_ has no FP8 kernel)."""
    cache.view(torch.uint8).index_copy_(0, index, blocks.view(torch.uint8))


class KVReceiver:
    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, compat: str, ctx: zmq.Context) -> None:
        self.config, self.kv_caches, self.compat, self.ctx = config, kv_caches, compat, ctx
        self.codec = WireCodec(config.secret, ToReceiver)
        # K (or V) of one block of each layer: layers may differ in dtype (FP8 cache, skipped layers)
        self._layer_block_bytes = [k[0].numel() * k.element_size() for k, *_ in kv_caches]
        self._dtypes = [k.dtype for k, *_ in kv_caches]
        self._per_layer = len(kv_caches[0])  # 2 (K, V), or 1 where V is K (MLA)
        # no legitimate frame is larger
        self._frame_cap = data_frame_cap(kv_caches[0][0].shape[0], max(self._layer_block_bytes))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._socks: dict[str, zmq.Socket] = {}  # one DEALER per prefill endpoint, all in _poller
        self._monitors: dict[zmq.Socket, str] = {}  # handshake-failure monitor of each DEALER -> its endpoint
        self._poller = zmq.Poller()
        # rung by the core thread after queueing a command: a new load starts now, not at the next poll
        self._bell = Doorbell(ctx, "kv-receiver")
        self._poller.register(self._bell.socket, zmq.POLLIN)
        self._loads: dict[str, _Load] = {}  # lease id -> load in progress
        self._watched: dict[str, Ticket] = {}  # lease id -> ticket kept alive by heartbeats
        self._regions: dict[str, RemoteRegion] = {}  # prefill endpoint -> its mapped KV region
        self._no_shm: set[str] = set()  # endpoints whose region could not be mapped from here
        self._last_heartbeat = 0.0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()

    # -- core thread ----------------------------------------------------------------------------------------
    def watch(self, ticket: Ticket) -> None:
        """Keep this lease alive (heartbeats) until it is loaded or released."""
        self._command(("watch", ticket))

    def load(self, request_id: str, ticket: Ticket, remote_block_ids: list[int], local_block_ids: list[int]) -> None:
        index = torch.tensor(local_block_ids, dtype=torch.int64, device=self.kv_caches[0][0].device)
        self._command(("load", _Load(request_id, ticket, remote_block_ids, index)))

    def cancel(self, request_id: str) -> None:
        self._command(("cancel", request_id))

    def release(self, ticket: Ticket) -> None:
        """The request no longer needs the remote blocks (aborted, or all of them cached here)."""
        self._command(("release", ticket))

    def _command(self, command: tuple) -> None:
        self._commands.put(command)
        self._bell.ring()

    def take_results(self) -> list[LoadResult]:
        return drain(self._results)

    def close(self) -> None:
        self._stopped = True
        self._thread.join(2)
        for sock in self._socks.values():
            sock.disable_monitor()
            sock.close(0)
        for monitor in self._monitors:
            monitor.close(0)
        self._bell.close()

    # -- receiver thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            try:
                self._drain_commands()
                for sock, _ in self._poller.poll(_POLL_MS):
                    if sock is self._bell.socket:
                        self._bell.clear()
                        continue
                    if sock in self._monitors:
                        recv_monitor_message(sock)
                        self._fail_refused(self._monitors[sock])
                        continue
                    self._on_message(sock.recv_multipart(copy=False))
                self._heartbeat()
                self._expire_stalled()
            except Exception:
                logger.exception("KV receiver step failed")

    def _sock(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self._frame_cap)
            present_secret(sock, self.config.secret, KV_TRANSFER_CHANNEL)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # refused our password
            self._monitors[monitor] = endpoint
            self._poller.register(monitor, zmq.POLLIN)
            sock.connect(endpoint)
            self._poller.register(sock, zmq.POLLIN)
            self._socks[endpoint] = sock
        return sock

    def _send(self, endpoint: str, msg) -> bool:
        """Never blocks: a peer that stopped reading (or never connected) fills its queue
        (SNDHWM) and further messages to it are dropped; its loads then time out."""
        try:
            self._sock(endpoint).send_multipart(self.codec.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            logger.warning("KV receiver: %s is not reading; dropped %s", endpoint, type(msg).__name__)
            return False

    def _drain_commands(self) -> None:
        while True:
            try:
                verb, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if verb == "watch":
                self._watched[arg.lease_id] = arg
                self._sock(arg.engine)
            elif verb == "load":
                try:
                    self._start(arg)
                except Exception as e:
                    logger.exception("KV load %s failed to start", arg.request_id)
                    self._finish(arg, LoadResult(arg.request_id, False, "internal", str(e)))
            elif verb == "cancel":
                for load in [x for x in self._loads.values() if x.request_id == arg]:
                    self._finish(load, LoadResult(arg, False, "cancelled", "request aborted during the transfer"))
            elif verb == "release":
                self._watched.pop(arg.lease_id, None)
                self._send(arg.engine, Release(arg.lease_id))

    def _start(self, load: _Load) -> None:
        ticket = load.ticket
        self._watched.pop(ticket.lease_id, None)
        if ticket.compat != self.compat:
            self._results.put(LoadResult(load.request_id, False, "incompatible",
                                         "model, dtype, block size or KV layout differ between the workers"))
            self._send(ticket.engine, Release(ticket.lease_id))
            return
        self._loads[ticket.lease_id] = load
        self._pull(load)

    def _pull(self, load: _Load) -> None:
        ticket = load.ticket
        host = host_id() if self.config.transport == "auto" and ticket.engine not in self._no_shm else ""
        load.pull_sent = time.monotonic()
        self._send(ticket.engine, Pull(ticket.lease_id, self.compat, load.remote_block_ids, host, ticket.pending,
                                ticket.prompt if ticket.pending else ""))

    def _on_message(self, frames: list) -> None:
        try:
            msg, payload = self.codec.decode(frames)
        except PermissionError:
            self._fail_unauthenticated(frames)
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.warning("KV receiver dropped a bad message: %s", e)
            return
        if not isinstance(msg, (LayerData, ShmGrant, PullWaiting, PullDone, PullError)):
            logger.warning("KV receiver dropped a %s, which only a sender receives", type(msg).__name__)
            return
        load = self._loads.get(msg.lease_id)
        if load is None:
            return  # a load we already gave up on
        load.last_progress = time.monotonic()
        try:
            self._apply(load, msg, payload)
        except Exception as e:
            logger.exception("KV load %s failed", load.request_id)
            self._finish(load, LoadResult(load.request_id, False, "internal", str(e)))

    def _apply(self, load: _Load, msg, payload: list) -> None:
        if isinstance(msg, LayerData):
            self._write_layer(load, msg, payload)
        elif isinstance(msg, ShmGrant):
            self._read_shm(load, msg)
        elif isinstance(msg, PullDone):
            ok = load.written == len(self.kv_caches) * len(load.local_index) and msg.num_layers == len(self.kv_caches)
            self._finish(load, LoadResult(load.request_id, ok, "" if ok else "bad_blocks",
                                          "" if ok else "incomplete transfer", load.num_bytes,
                                          time.monotonic() - load.started))
        elif isinstance(msg, PullError):
            self._finish(load, LoadResult(load.request_id, False, msg.kind, msg.message))

    def _write_layer(self, load: _Load, msg: LayerData, payload: list) -> None:
        """K and V of the pull's blocks [first_block, first_block + num_blocks) of one layer.
        NOTE: the sender sends every (layer, block) once, so counting pieces detects completion."""
        caches = self.kv_caches[msg.layer] if 0 <= msg.layer < len(self.kv_caches) else ()
        n, first = msg.num_blocks, msg.first_block
        shape = (n, *caches[0].shape[1:]) if caches else ()
        expected = n * self._layer_block_bytes[msg.layer] if caches else 0
        if not caches or n < 1 or first < 0 or first + n > len(load.local_index) or msg.nbytes != expected \
                or len(payload) != len(caches) or any(len(p.buffer) != expected for p in payload):
            self._finish(load, LoadResult(load.request_id, False, "bad_blocks", f"malformed layer {msg.layer}"))
            return
        index = load.local_index[first:first + n]
        for cache, frame in zip(caches, payload):
            data = torch.frombuffer(frame.buffer, dtype=torch.uint8).view(cache.dtype).view(shape)
            _copy_blocks(cache, index, data.to(cache.device))
        load.written += n
        load.num_bytes += len(caches) * expected

    def _read_shm(self, load: _Load, grant: ShmGrant) -> None:
        engine = load.ticket.engine
        try:
            region = self._region(engine, grant)
        except OSError as e:  # another pid namespace, or the worker is gone: the bytes go by TCP
            logger.info("KV region of %s not mappable here (%s); using TCP", engine, e)
            self._no_shm.add(engine)
            self._pull(load)
            return
        block_shape = tuple(self.kv_caches[0][0].shape[1:])
        block_ids = grant.block_ids or load.remote_block_ids
        if grant.nbytes != kv_region_layout(block_shape, grant.num_blocks, self._dtypes, self._per_layer)[1] \
                or len(block_ids) != len(load.local_index) \
                or not 0 <= min(block_ids) <= max(block_ids) < grant.num_blocks:
            self._finish(load, LoadResult(load.request_id, False, "bad_blocks", "grant does not match the layout"))
            return
        remote = region.layers(block_shape, grant.num_blocks, self._dtypes, self._per_layer)
        index = torch.tensor(block_ids, dtype=torch.int64)
        for caches, remote_caches in zip(self.kv_caches, remote):
            for cache, source in zip(caches, remote_caches):
                _copy_blocks(cache, load.local_index, source.index_select(0, index).to(cache.device))
        # see the lease invariant in shm.py; held_s: how long the sender held the pull (parked
        # until its prefill ended) before granting, so the bound still starts before the grant
        if time.monotonic() >= load.pull_sent + grant.held_s + grant.valid_s:
            self._finish(load, LoadResult(load.request_id, False, "lease_expired", "copy outlived the lease"))
            return
        num_bytes = self._per_layer * len(index) * sum(self._layer_block_bytes)
        self._finish(load, LoadResult(load.request_id, True, num_bytes=num_bytes,
                                      seconds=time.monotonic() - load.started, transport="shm"))

    def _region(self, engine: str, grant: ShmGrant) -> RemoteRegion:
        region = self._regions.get(engine)
        if region is None or region.token != grant.token:  # first grant, or the worker restarted
            region = self._regions[engine] = RemoteRegion(grant.pid, grant.fd, grant.token, grant.nbytes)
        return region

    def _fail_refused(self, endpoint: str) -> None:
        """The prefill worker at ``endpoint`` refused this worker's password: every load from it fails."""
        for load in [x for x in self._loads.values() if x.ticket.engine == endpoint]:
            self._finish(load, LoadResult(load.request_id, False, "unauthenticated",
                                          "the prefill worker does not share this worker's secret"))

    def _fail_unauthenticated(self, frames: list) -> None:
        try:
            lease_id = msgspec.msgpack.decode(bytes(frames[0].buffer), type=PullError).lease_id
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError):
            return
        load = self._loads.get(lease_id)
        if load is not None:
            self._finish(load, LoadResult(load.request_id, False, "unauthenticated",
                                          "the prefill worker does not share this worker's secret"))

    def _finish(self, load: _Load, result: LoadResult) -> None:
        """The one result of a load; the remote lease is released whatever the outcome."""
        self._loads.pop(load.ticket.lease_id, None)
        self._send(load.ticket.engine, Release(load.ticket.lease_id))
        self._results.put(result)

    def _heartbeat(self) -> None:
        """Renew every watched or loading lease three times per lease length of its issuer."""
        tickets = [*self._watched.values(), *(x.ticket for x in self._loads.values())]
        if not tickets:
            return
        now = time.monotonic()
        if now - self._last_heartbeat < min(t.lease_s for t in tickets) / 3:
            return
        self._last_heartbeat = now
        by_engine: dict[str, list[str]] = {}
        for ticket in tickets:
            by_engine.setdefault(ticket.engine, []).append(ticket.lease_id)
        for engine, lease_ids in by_engine.items():
            self._send(engine, Renew(lease_ids))

    def _expire_stalled(self) -> None:
        now = time.monotonic()
        for load in [x for x in self._loads.values() if now - x.last_progress > self.config.transfer_timeout_s]:
            if load.ticket.pending:  # the prefill worker went away before its lease was done
                self._finish(load, LoadResult(load.request_id, False, "prefill_failed",
                                              f"{load.ticket.engine} went silent before its prefill was done"))
                continue
            self._finish(load, LoadResult(load.request_id, False, "timeout",
                                          f"no data from {load.ticket.engine} for "
                                          f"{self.config.transfer_timeout_s:.1f} s (worker gone or link down)"))
