"""Which worker already holds a request's prefix in its KV cache.

* ``prompt_block_hashes``: the engine's chained hashes of a prompt's full blocks.
* ``PrefixIndex``: exact per-worker sets of cached block hashes, built from the workers' KV events,
  one set per tier: the device pool (events with ``medium`` None) and each offload tier (``"CPU"``,
  ``"DISK"``, ...). An event changes only its own tier; ``AllBlocksCleared`` clears only the device
  tier; a worker restart drops every tier.
* ``ApproxPrefixIndex``: for workers that publish no events, what the router itself sent them (LRU).

Matching a request's block hashes against a worker (both indexes answer both questions):
  ``match_blocks``    leading blocks held in ANY tier (an int): the prefix ends at the first block
                      held in no tier.
  ``match_weighted``  the same leading blocks, each counted with the weight of the best tier that
                      holds it: device 1.0, then ``tier_weights`` (default CPU 0.8, DISK 0.5; a medium
                      not in the table weighs as the lightest one there). A float in [0, match_blocks]:
                      cache-equivalent blocks, what routing scores and prefill costs use.
  ``ApproxPrefixIndex`` has no tiers: its weighted match equals its block match.
* ``KVEventSubscriber``: keeps one worker's part of a ``PrefixIndex`` in step with its publisher
  (``tandem.engine.kv_publisher``), filling gaps by replay and resynchronising when it cannot.

Sequence rules (``PrefixIndex.classify``), with ``expected`` = last applied seq + 1 (None if unknown):
  ok       seq == expected, or expected is None and seq == 0.
  gap      seq > expected, or expected is None and seq > 0: batches were missed.
  restart  seq < expected and (seq == 0 or batch.ts > ts of the last applied batch): a new worker
           process (its seq restarts at 0; the ts rule catches a restart whose seq 0 we missed).
  stale    seq < expected otherwise: a duplicate (e.g. a replayed batch we already applied).
Limitation: a worker that restarts and publishes more batches than ``expected`` while we hear
nothing looks like a gap, not a restart; its old blocks stay in the index until evicted by events.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from tandem.engine.block_pool import hash_block_tokens
from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch
from tandem.engine.kv_publisher import END_OF_REPLAY, KV_EVENTS_CHANNEL, TOPIC, sign
from tandem.zmq_auth import present_secret

logger = logging.getLogger(__name__)

OK, GAP, STALE, RESTART = "ok", "gap", "stale", "restart"

# Weight of a block held only in an offload tier, relative to one on the device (1.0): about the
# share of its prefill work the worker saves by loading it from there instead of recomputing it.
DEFAULT_TIER_WEIGHTS: dict[str, float] = {"CPU": 0.8, "DISK": 0.5}


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """The engine's hashes of the prompt's full blocks (``KVCacheManager.update_block_hashes``):
    block i covers tokens [i*bs, (i+1)*bs), chained on block i-1; the salt keys block 0 only."""
    hashes: list[bytes] = []
    parent: bytes | None = None
    for i in range(len(token_ids) // block_size):
        extra = (cache_salt,) if (i == 0 and cache_salt) else ()
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes


def _leading_matches(blocks, block_hashes: Sequence[bytes]) -> int:
    """Consecutive hits from the first block: O(matched + 1) lookups."""
    n = 0
    for h in block_hashes:
        if h not in blocks:
            break
        n += 1
    return n


# -- exact index from events ------------------------------------------------------------------------
@dataclass
class _WorkerEntry:
    blocks: set[bytes] = field(default_factory=set)  # the device pool (medium None)
    offloaded: dict[str, set[bytes]] = field(default_factory=dict)  # medium -> hashes; no empty sets
    next_seq: int | None = None  # last applied seq + 1; None until a batch is applied (or after reset)
    last_ts: float = float("-inf")  # ts of the last applied batch


class PrefixIndex:
    """Per-worker, per-tier sets of cached block hashes. Invariant: a worker's sets are the result
    of applying its batches in seq order (exactly, unless a gap was applied without being filled).

    ``tier_weights``: offload medium -> weight in [0, 1] for ``match_weighted`` (the device tier
    always weighs 1.0); default ``DEFAULT_TIER_WEIGHTS``."""

    def __init__(self, tier_weights: Mapping[str, float] | None = None) -> None:
        weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        for medium, weight in weights.items():
            if not isinstance(medium, str) or not 0.0 <= float(weight) <= 1.0:
                raise ValueError(f"tier_weights: {medium!r} -> {weight!r}; want a medium name -> weight in [0, 1]")
        self.tier_weights = {m: float(w) for m, w in weights.items()}
        self._unknown_weight = min(self.tier_weights.values(), default=0.0)
        self._workers: dict[str, _WorkerEntry] = {}

    def classify(self, worker: str, seq: int, ts: float) -> str:
        """What ``apply`` would return for a batch, without applying it (rules: module docstring)."""
        entry = self._workers.get(worker)
        expected = entry.next_seq if entry else None
        if expected is None:
            return OK if seq == 0 else GAP
        if seq == expected:
            return OK
        if seq > expected:
            return GAP
        assert entry is not None  # expected is None without an entry
        return RESTART if (seq == 0 or ts > entry.last_ts) else STALE

    def apply(self, worker: str, batch: KVEventBatch) -> str:
        """Apply one batch. "gap" batches are applied too (the caller should replay the missed ones
        first when it can); "restart" drops the worker's entries first; "stale" changes nothing."""
        status = self.classify(worker, batch.seq, batch.ts)
        if status == STALE:
            return status
        entry = self._workers.setdefault(worker, _WorkerEntry())
        if status == RESTART:
            entry.blocks.clear()
            entry.offloaded.clear()
        for event in batch.events:
            _apply_event(entry, event)
        entry.next_seq, entry.last_ts = batch.seq + 1, batch.ts
        return status

    def expected_seq(self, worker: str) -> int | None:
        entry = self._workers.get(worker)
        return entry.next_seq if entry else None

    def match_blocks(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Every known worker -> how many leading blocks of the request it holds in any tier. A
        worker without the first block costs one lookup per tier it has."""
        return {w: self._match(e, block_hashes)[0] for w, e in self._workers.items()}

    def match_weighted(self, block_hashes: Sequence[bytes]) -> dict[str, float]:
        """Every known worker -> its leading blocks of the request (as ``match_blocks``), each
        weighted by the best tier holding it (device 1.0, offload tiers by ``tier_weights``)."""
        return {w: self._match(e, block_hashes)[1] for w, e in self._workers.items()}

    def _match(self, entry: _WorkerEntry, block_hashes: Sequence[bytes]) -> tuple[int, float]:
        """(leading blocks in any tier, their weighted count); O(matched + 1) lookups per tier."""
        if not entry.offloaded:
            n = _leading_matches(entry.blocks, block_hashes)
            return n, float(n)
        tiers = sorted(((self.weight(m), hs) for m, hs in entry.offloaded.items()), key=lambda t: -t[0])
        device = entry.blocks
        n, weighted = 0, 0.0
        for h in block_hashes:
            if h in device:
                weighted += 1.0
            else:
                for weight, hashes in tiers:
                    if h in hashes:
                        weighted += weight
                        break
                else:
                    break
            n += 1
        return n, weighted

    def weight(self, medium: str | None) -> float:
        """The weight of a block in tier ``medium`` (None: the device, 1.0)."""
        if medium is None:
            return 1.0
        return self.tier_weights.get(medium, self._unknown_weight)

    def remove_worker(self, worker: str) -> None:
        self._workers.pop(worker, None)

    def reset_worker(self, worker: str) -> None:
        """Drop the worker's entries and forget its seq; it stays known (matching 0 blocks)."""
        self._workers[worker] = _WorkerEntry()

    def workers(self) -> list[str]:
        return list(self._workers)

    def num_blocks(self, worker: str, medium: str | None = None) -> int:
        """Blocks the worker holds in tier ``medium`` (None: its device pool)."""
        return len(self._tier(worker, medium))

    def blocks(self, worker: str, medium: str | None = None) -> frozenset[bytes]:
        """A copy of the worker's hashes in tier ``medium`` (None: its device pool), for tests and
        debugging."""
        return frozenset(self._tier(worker, medium))

    def media(self, worker: str) -> list[str]:
        """The offload tiers the worker holds blocks in (the device tier is not listed)."""
        entry = self._workers.get(worker)
        return sorted(entry.offloaded) if entry else []

    def _tier(self, worker: str, medium: str | None) -> set[bytes]:
        entry = self._workers.get(worker)
        if entry is None:
            return set()
        return entry.blocks if medium is None else entry.offloaded.get(medium, set())


def _apply_event(entry: _WorkerEntry, event: KVEvent) -> None:
    """One event on its own tier only (``medium`` None: the device pool)."""
    if isinstance(event, BlockStored):
        if event.medium is None:
            entry.blocks.update(event.block_hashes)
        elif event.block_hashes:
            entry.offloaded.setdefault(event.medium, set()).update(event.block_hashes)
    elif isinstance(event, BlockRemoved):
        if event.medium is None:
            entry.blocks.difference_update(event.block_hashes)
        elif (hashes := entry.offloaded.get(event.medium)) is not None:
            hashes.difference_update(event.block_hashes)
            if not hashes:
                del entry.offloaded[event.medium]
    elif isinstance(event, AllBlocksCleared):
        entry.blocks.clear()  # the device pool only: offload tiers keep theirs


# -- approximate index from the router's own decisions ----------------------------------------------
class ApproxPrefixIndex:
    """What the router sent to each worker, as an LRU of at most ``capacity_blocks`` hashes per
    worker. ``record`` is the "use": it refreshes hashes; ``match_blocks`` is read-only.
    A request's hashes are refreshed last-block-first, so block 0 is the most recent and a prompt's
    tail is evicted before its head (leading prefixes survive, as in the engine's own eviction)."""

    def __init__(self, capacity_blocks: int = 100_000) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        self.capacity_blocks = capacity_blocks
        # per worker: hash -> None, least recently used first
        self._workers: dict[str, OrderedDict[bytes, None]] = {}

    def record(self, worker: str, block_hashes: list[bytes]) -> None:
        lru = self._workers.setdefault(worker, OrderedDict())
        for h in reversed(block_hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def match_blocks(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        return {w: _leading_matches(lru, block_hashes) for w, lru in self._workers.items()}

    def match_weighted(self, block_hashes: Sequence[bytes]) -> dict[str, float]:
        """No tiers here: every matched block weighs 1."""
        return {w: float(n) for w, n in self.match_blocks(block_hashes).items()}

    def remove_worker(self, worker: str) -> None:
        self._workers.pop(worker, None)

    def workers(self) -> list[str]:
        return list(self._workers)

    def num_blocks(self, worker: str) -> int:
        lru = self._workers.get(worker)
        return len(lru) if lru else 0


# -- subscriber ---------------------------------------------------------------------------------------
class KVEventSubscriber:
    """Feeds one worker's KV events into a ``PrefixIndex``.

    Live batches are applied in seq order. On a gap (also: the first batch seen has seq > 0, i.e.
    we joined late) it replays from the expected seq and applies the replayed batches, then the live
    one. If the replay cannot fill the gap (no replay endpoint, timeout, or the replay starts past
    the expected seq) it resyncs fully: ``reset_worker`` and replay from seq 0. If that cannot
    rebuild the index either, the worker is ``degraded``: the index keeps what the available batches
    say (it may miss blocks cached earlier) until a restart, an AllBlocksCleared or a later
    successful resync makes it exact again.
    With a secret, a message whose MAC does not verify is dropped before any decoding."""

    def __init__(self, index: PrefixIndex, worker: str, endpoint: str, replay_endpoint: str | None,
                 secret: bytes | None, ctx: zmq.asyncio.Context | None = None,
                 replay_timeout: float = 2.0) -> None:
        self.index, self.worker = index, worker
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.secret = secret or None
        self.replay_timeout = replay_timeout
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.degraded = False
        self.batches = 0  # batches applied (live and replayed)
        self.gaps = 0  # gaps seen, late join included
        self.resyncs = 0  # full resyncs from seq 0
        self.restarts = 0  # worker restarts seen
        self.stale = 0  # duplicates ignored
        self.bad_macs = 0  # messages dropped because their MAC did not verify
        self.malformed = 0  # messages dropped because of their shape or encoding

    # -- lifecycle
    async def run(self) -> None:
        """Receive until ``close()``; returns normally then."""
        if self._closed:
            return
        self._task = asyncio.current_task()
        self._sub = self.ctx.socket(zmq.SUB)
        self._log_in(self._sub)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self._sub.connect(self.endpoint)
        try:
            while not self._closed:
                batch = self._parse_live(await self._sub.recv_multipart())
                if batch is not None:
                    await self._on_batch(batch)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        finally:
            self._close_sockets()

    def close(self) -> None:
        """Stop ``run`` (call from the event loop's thread); idempotent."""
        self._closed = True
        if self._task is None:
            self._close_sockets()
        elif not self._task.done():
            self._task.cancel()  # run() sees _closed, closes its sockets and returns

    def _close_sockets(self) -> None:
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None
        if self._own_ctx and self._closed:
            self.ctx.term()
            self._own_ctx = False

    # -- verification
    def _parse_live(self, frames: list[bytes]) -> KVEventBatch | None:
        if len(frames) != 4 or frames[0] != TOPIC:
            self.malformed += 1
            return None
        return self._verify(frames[1:])

    def _verify(self, frames: list[bytes]) -> KVEventBatch | None:
        """[seq, payload, mac] -> the batch, or None (counted) when it must be dropped."""
        seq, payload, mac = frames
        if self.secret is not None and not hmac.compare_digest(mac, sign(self.secret, seq, payload)):
            self.bad_macs += 1
            return None
        try:
            batch = self._decoder.decode(payload)
        except msgspec.DecodeError:
            batch = None
        if batch is None or len(seq) != 8 or batch.seq != int.from_bytes(seq, "big", signed=True):
            self.malformed += 1
            return None
        return batch

    # -- sequencing
    async def _on_batch(self, batch: KVEventBatch) -> None:
        status = self.index.classify(self.worker, batch.seq, batch.ts)
        if status == STALE:
            self.stale += 1
        elif status == OK or (status == RESTART and batch.seq == 0):
            self._apply(batch)
        elif status == RESTART:  # a new process whose first batches we missed: rebuild from 0
            self.restarts += 1
            self.index.reset_worker(self.worker)
            await self._catch_up(batch)
        else:
            self.gaps += 1
            await self._catch_up(batch)

    def _apply(self, batch: KVEventBatch) -> None:
        status = self.index.apply(self.worker, batch)
        if status == STALE:
            self.stale += 1
            return
        self.batches += 1
        if status == RESTART:
            self.restarts += 1
        # a restart (seq 0) or a clear makes the index exact again
        if status == RESTART or batch.seq == 0 or any(isinstance(e, AllBlocksCleared) for e in batch.events):
            self.degraded = False

    async def _catch_up(self, live: KVEventBatch) -> None:
        start = self.index.expected_seq(self.worker) or 0
        replayed = await self._replay(start)
        if replayed is not None and self._fill(replayed + [live]):
            return
        await self._resync(live)

    async def _resync(self, live: KVEventBatch) -> None:
        self.resyncs += 1
        self.index.reset_worker(self.worker)
        replayed = await self._replay(0)
        batches = (replayed or []) + [live]
        if replayed is not None and self._fill(batches):
            self.degraded = False
            return
        # cannot rebuild exactly: start over with what the batches we have say
        logger.warning("KV events of %s: cannot fill a gap; index degraded", self.worker)
        self.index.reset_worker(self.worker)
        self.degraded = True
        for batch in batches:
            if self.index.classify(self.worker, batch.seq, batch.ts) != STALE:
                self.index.apply(self.worker, batch)
                self.batches += 1

    def _fill(self, batches: list[KVEventBatch]) -> bool:
        """Apply batches that continue the index exactly; False at the first one that does not."""
        for batch in batches:
            status = self.index.classify(self.worker, batch.seq, batch.ts)
            if status == STALE:
                continue
            if status != OK:
                return False
            self._apply(batch)
        return True

    def _log_in(self, sock: zmq.Socket) -> None:
        if self.secret is not None:  # the worker's sockets take only peers with its password
            present_secret(sock, self.secret, KV_EVENTS_CHANNEL)

    async def _replay(self, start: int) -> list[KVEventBatch] | None:
        """Verified batches with seq >= start from the replay socket, or None when there is no
        replay endpoint or it does not answer in time. A fresh DEALER per request, so a late reply
        to an abandoned request can never be mixed into a new one."""
        if not self.replay_endpoint:
            return None
        dealer = self.ctx.socket(zmq.DEALER)
        self._log_in(dealer)
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            return await self._read_replay(dealer)
        finally:
            dealer.close(0)

    async def _read_replay(self, dealer: zmq.asyncio.Socket) -> list[KVEventBatch] | None:
        batches: list[KVEventBatch] = []
        timeout_ms = int(self.replay_timeout * 1000)
        while True:
            if not await dealer.poll(timeout_ms):
                logger.warning("KV events of %s: replay timed out", self.worker)
                return None
            frames = await dealer.recv_multipart()
            if len(frames) != 4 or frames[0] != b"":
                self.malformed += 1
                continue
            if frames[1] == END_OF_REPLAY:
                return batches
            batch = self._verify(frames[1:])
            if batch is not None:
                batches.append(batch)
