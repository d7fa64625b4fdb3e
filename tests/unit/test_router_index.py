"""The router's prefix indexes and the KV event subscriber that feeds them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time

import msgspec
import pytest
import zmq

from tandem import SamplingParams
from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from tandem.engine.kv_publisher import KVEventPublisher
from tandem.router.index import ApproxPrefixIndex, KVEventSubscriber, PrefixIndex, prompt_block_hashes
from tandem.router.pd import PDCosts, PDDecider
from tandem.router.policy import PrefillCostScorer, PrefixCacheScorer, build_policy
from tandem.router.types import RouteRequest, WorkerState

W1, W2 = "http://w1:8000", "http://w2:8000"


def h(*key) -> bytes:
    return hashlib.sha256(repr(key).encode()).digest()


def stored(*hashes: bytes) -> BlockStored:
    return BlockStored(list(hashes), None, [0] * 4, 4)


def batch(seq: int, *events, ts: float | None = None) -> KVEventBatch:
    return KVEventBatch(seq, float(seq) if ts is None else ts, list(events))


# -- PrefixIndex, no network --------------------------------------------------------------------------
def test_apply_stored_removed_cleared():
    index = PrefixIndex()
    a, b, c = h("a"), h("b"), h("c")
    assert index.apply(W1, batch(0, stored(a, b), stored(c))) == "ok"
    assert index.blocks(W1) == {a, b, c} and index.num_blocks(W1) == 3
    assert index.apply(W1, batch(1, BlockRemoved([b]), BlockRemoved([h("unknown")]))) == "ok"
    assert index.blocks(W1) == {a, c}
    assert index.apply(W1, batch(2, AllBlocksCleared(), stored(b))) == "ok"  # in order within a batch
    assert index.blocks(W1) == {b}
    assert index.expected_seq(W1) == 3 and index.expected_seq(W2) is None
    assert index.workers() == [W1] and index.num_blocks(W2) == 0


def test_match_blocks_counts_leading_blocks_only():
    index = PrefixIndex()
    req = [h("r", i) for i in range(6)]
    index.apply(W1, batch(0, stored(*req[:4])))
    index.apply(W2, batch(0, stored(req[0], req[1], req[3], req[4], req[5])))  # hole at block 2
    index.apply("http://w3", batch(0, stored(*req[1:])))  # lacks the first block
    assert index.match_blocks(req) == {W1: 4, W2: 2, "http://w3": 0}
    assert index.match_blocks([]) == {W1: 0, W2: 0, "http://w3": 0}
    assert index.match_blocks(req[:2]) == {W1: 2, W2: 2, "http://w3": 0}


def test_match_blocks_cost_is_matched_blocks():
    index = PrefixIndex()
    req = [h("long", i) for i in range(20_000)]
    for i in range(50):
        index.apply(f"http://idle{i}", batch(0, stored(h("other", i))))
    index.apply(W1, batch(0, stored(*req[:10])))
    t0 = time.perf_counter()
    for _ in range(100):
        result = index.match_blocks(req)
    assert result[W1] == 10 and result["http://idle0"] == 0
    assert time.perf_counter() - t0 < 0.5  # a full scan would be 100 * 20k * 51 lookups


def test_gap_stale_restart():
    index = PrefixIndex()
    a, b, c, d = h("a"), h("b"), h("c"), h("d")
    assert index.apply(W1, batch(0, stored(a), ts=100.0)) == "ok"
    assert index.apply(W1, batch(1, stored(b), ts=101.0)) == "ok"
    assert index.apply(W1, batch(3, stored(c), ts=103.0)) == "gap"  # applied anyway
    assert index.blocks(W1) == {a, b, c} and index.expected_seq(W1) == 4
    assert index.apply(W1, batch(1, stored(d), ts=101.0)) == "stale"  # duplicate: ignored
    assert index.blocks(W1) == {a, b, c} and index.expected_seq(W1) == 4
    assert index.classify(W1, 4, 104.0) == "ok"
    # a new process: seq back to 0 -> entries dropped, then the batch applied
    assert index.apply(W1, batch(0, stored(d), ts=200.0)) == "restart"
    assert index.blocks(W1) == {d} and index.expected_seq(W1) == 1
    # seq 0 always restarts, whatever its ts (the rule the brief fixes)
    index.apply(W1, batch(1, stored(a), ts=201.0))
    assert index.classify(W1, 0, 0.0) == "restart"
    # a restart whose seq 0 was missed: seq below expected but newer than anything applied
    index.apply(W1, batch(2, ts=202.0))
    assert index.classify(W1, 1, 300.0) == "restart"
    assert index.classify(W1, 1, 201.0) == "stale"


def test_first_batch_seq_above_zero_is_a_gap():
    index = PrefixIndex()
    assert index.classify(W1, 0, 0.0) == "ok"
    assert index.apply(W1, batch(5, stored(h("x")))) == "gap"
    assert index.expected_seq(W1) == 6


def test_remove_and_reset_worker():
    index = PrefixIndex()
    index.apply(W1, batch(0, stored(h("a"))))
    index.apply(W2, batch(0, stored(h("a"))))
    index.remove_worker(W1)
    index.remove_worker("http://never-seen")
    assert index.workers() == [W2] and index.match_blocks([h("a")]) == {W2: 1}
    index.reset_worker(W2)
    assert index.expected_seq(W2) is None and index.num_blocks(W2) == 0
    assert index.match_blocks([h("a")]) == {W2: 0}
    assert index.apply(W2, batch(7, stored(h("b")))) == "gap"  # seq forgotten


# -- tiers: the device pool (medium None) and offload tiers (CPU, DISK) ------------------------------------
def on(medium: str | None, *hashes: bytes) -> BlockStored:
    return BlockStored(list(hashes), None, [0] * 4, 4, medium=medium)


def test_events_with_a_medium_change_only_their_tier():
    index = PrefixIndex()
    a, b, c = h("a"), h("b"), h("c")
    index.apply(W1, batch(0, stored(a, b), on("CPU", b, c), on("DISK", c)))
    assert index.blocks(W1) == {a, b} and index.num_blocks(W1) == 2  # the device tier
    assert index.blocks(W1, "CPU") == {b, c} and index.num_blocks(W1, "DISK") == 1
    assert index.media(W1) == ["CPU", "DISK"] and index.media(W2) == []
    index.apply(W1, batch(1, BlockRemoved([b]), BlockRemoved([c], medium="DISK")))
    assert index.blocks(W1) == {a} and index.blocks(W1, "CPU") == {b, c}
    assert index.blocks(W1, "DISK") == frozenset() and index.media(W1) == ["CPU"]
    index.apply(W1, batch(2, BlockRemoved([a], medium="CPU")))  # not on CPU: nothing changes
    assert index.blocks(W1) == {a} and index.blocks(W1, "CPU") == {b, c}


def test_block_evicted_from_device_but_on_cpu_matches_at_the_lower_weight():
    index = PrefixIndex()
    req = [h("r", i) for i in range(4)]
    index.apply(W1, batch(0, stored(*req), on("CPU", *req[:3]), on("DISK", req[0])))
    assert index.match_blocks(req) == {W1: 4} and index.match_weighted(req) == {W1: 4.0}
    index.apply(W1, batch(1, BlockRemoved(req[:2])))  # off the device: block 0, 1 now best on CPU
    assert index.match_blocks(req) == {W1: 4}
    assert index.match_weighted(req)[W1] == pytest.approx(0.8 + 0.8 + 1 + 1)
    index.apply(W1, batch(2, BlockRemoved([req[0]], medium="CPU")))  # block 0 left on DISK only
    assert index.match_weighted(req)[W1] == pytest.approx(0.5 + 0.8 + 1 + 1)
    index.apply(W1, batch(3, BlockRemoved([req[1]], medium="CPU")))  # block 1 in no tier: ends it
    assert index.match_blocks(req) == {W1: 1}
    assert index.match_weighted(req)[W1] == pytest.approx(0.5)
    index.apply(W1, batch(4, BlockRemoved([req[0]], medium="DISK")))
    assert index.match_blocks(req) == {W1: 0} and index.match_weighted(req) == {W1: 0.0}


def test_removal_from_cpu_after_device_removal_ends_the_match():
    index = PrefixIndex()
    req = [h("r", i) for i in range(3)]
    index.apply(W1, batch(0, stored(*req), on("CPU", *req)))
    index.apply(W1, batch(1, BlockRemoved(req)))
    assert index.match_blocks(req) == {W1: 3} and index.match_weighted(req)[W1] == pytest.approx(2.4)
    index.apply(W1, batch(2, BlockRemoved(req, medium="CPU")))
    assert index.match_blocks(req) == {W1: 0} and index.match_weighted(req) == {W1: 0.0}
    assert index.media(W1) == []


def test_all_blocks_cleared_keeps_the_offload_tiers():
    index = PrefixIndex()
    a, b = h("a"), h("b")
    index.apply(W1, batch(0, stored(a, b), on("CPU", a), on("DISK", b)))
    index.apply(W1, batch(1, AllBlocksCleared()))
    assert index.blocks(W1) == frozenset()
    assert index.blocks(W1, "CPU") == {a} and index.blocks(W1, "DISK") == {b}
    assert index.match_weighted([a, b])[W1] == pytest.approx(0.8 + 0.5)


def test_restart_drops_every_tier():
    index = PrefixIndex()
    a, b, c = h("a"), h("b"), h("c")
    index.apply(W1, batch(0, stored(a), on("CPU", b), on("DISK", c), ts=100.0))
    index.apply(W1, batch(1, ts=101.0))
    # the new process re-announces its disk blocks in its first batch
    assert index.apply(W1, batch(0, on("DISK", c), ts=200.0)) == "restart"
    assert index.blocks(W1) == frozenset() and index.blocks(W1, "CPU") == frozenset()
    assert index.blocks(W1, "DISK") == {c} and index.media(W1) == ["DISK"]
    index.reset_worker(W1)
    assert index.media(W1) == [] and index.match_blocks([c]) == {W1: 0}


def test_tier_weights_are_configurable():
    req = [h("r", i) for i in range(2)]
    index = PrefixIndex(tier_weights={"CPU": 0.5, "NVME": 0.25})
    index.apply(W1, batch(0, on("CPU", req[0]), on("NVME", req[1])))
    index.apply(W2, batch(0, on("DISK", *req)))  # not in the table: weighs as the lightest (0.25)
    assert index.match_weighted(req) == {W1: pytest.approx(0.75), W2: pytest.approx(0.5)}
    assert index.weight(None) == 1.0 and index.weight("CPU") == 0.5
    assert PrefixIndex().weight("CPU") == 0.8 and PrefixIndex().weight("DISK") == 0.5
    for bad in ({"CPU": 1.5}, {"CPU": -0.1}):
        with pytest.raises(ValueError):
            PrefixIndex(tier_weights=bad)


def test_router_yaml_tier_weights_reach_the_index_and_the_combined_matcher(tmp_path):
    import argparse

    from tandem.router.launch import add_router_args, build_router

    config = tmp_path / "router.yaml"
    config.write_text("scorers: {prefix_cache: 1}\ntier_weights: {CPU: 0.6}\n")
    args = add_router_args(argparse.ArgumentParser()).parse_args(
        ["--worker", f"{W1},events=tcp://127.0.0.1:1", "--worker", W2, "--config", str(config)])
    router, subscribers = build_router(args.worker, args, b"secret")
    index = subscribers[0].index
    assert index.tier_weights == {"CPU": 0.6} and router.decision == "router"
    req = [h("r", i) for i in range(2)]
    index.apply(W1, batch(0, on("CPU", *req)))
    router.approx.record(W2, req[:1])
    assert router.matcher.match_weighted(req) == {W1: pytest.approx(1.2), W2: 1.0}
    assert router.matcher.match_blocks(req) == {W1: 2, W2: 1}
    assert router.matcher.num_blocks(W1) == 0 and router.matcher.num_blocks(W2) == 1  # device / routed
    for sub in subscribers:
        sub.close()
    config.write_text("tier_weights: {CPU: 2}\n")
    with pytest.raises(ValueError):
        build_router(args.worker, args, b"secret")


def test_scorers_prefer_device_over_cpu_over_nothing():
    index = PrefixIndex()
    req_hashes = [h("p", i) for i in range(4)]
    dev, cpu, none = "http://dev:1", "http://cpu:1", "http://none:1"
    index.apply(dev, batch(0, stored(*req_hashes)))
    index.apply(cpu, batch(0, stored(*req_hashes), on("CPU", *req_hashes)))
    index.apply(cpu, batch(1, BlockRemoved(req_hashes)))  # evicted to host memory
    index.apply(none, batch(0, stored(h("other"))))
    workers = [WorkerState(url) for url in (dev, cpu, none)]
    req = RouteRequest("m", list(range(16)), req_hashes)
    assert PrefixCacheScorer(index)(req, workers) == {dev: 1.0, cpu: pytest.approx(0.8), none: 0.0}
    costs = PrefillCostScorer(index, block_size=4).costs(req, workers)
    assert costs[dev] == 0 and costs[cpu] == pytest.approx(16 * 0.2) and costs[none] == 16
    policy = build_policy("cache-aware", index, rng=random.Random(0))
    scores = policy.scores(req, workers)
    assert scores[dev] > scores[cpu] > scores[none]
    assert policy.pick(req, workers, record=False).url == dev
    assert policy.pick(req, workers[1:], record=False).url == cpu


def test_pd_decider_counts_the_decode_workers_host_tier_as_cache():
    index = PrefixIndex()
    req = [h("p", i) for i in range(62)]  # 992 of 1000 tokens in full blocks of 16
    d, p = WorkerState("http://d", role="decode", num_running=6), WorkerState("http://p", role="prefill")
    decider = PDDecider(PDCosts(kv_bytes_per_token=24_576), block_size=16)
    index.apply(d.url, batch(0, stored(h("other"))))
    assert decider.plan(1000, d, [p], index.match_blocks(req)).split  # busy and uncached: sheds it
    index.apply(d.url, batch(1, on("CPU", *req)))
    assert not decider.plan(1000, d, [p], index.match_blocks(req)).split  # in host memory: keeps it


def test_events_with_a_medium_round_trip_and_old_events_decode_as_device():
    new = KVEventBatch(3, 1.5, [on("CPU", h("a")), BlockRemoved([h("b")], medium="DISK"), stored(h("c")),
                                AllBlocksCleared()])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=KVEventBatch) == new

    # the same structs as published before tiers existed (same tags, no medium field)
    class OldStored(msgspec.Struct, tag="BlockStored", frozen=True):
        block_hashes: list[bytes]
        parent_block_hash: bytes | None
        token_ids: list[int]
        block_size: int

    class OldRemoved(msgspec.Struct, tag="BlockRemoved", frozen=True):
        block_hashes: list[bytes]

    class OldBatch(msgspec.Struct, frozen=True):
        seq: int
        ts: float
        events: list[OldStored | OldRemoved]

    old = OldBatch(0, 1.0, [OldStored([h("a")], None, [1, 2], 2), OldRemoved([h("b")])])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=KVEventBatch)
    assert [type(e).__name__ for e in decoded.events] == ["BlockStored", "BlockRemoved"]
    assert all(e.medium is None for e in decoded.events)
    index = PrefixIndex()
    index.apply(W1, decoded)
    assert index.blocks(W1) == {h("a")} and index.media(W1) == []  # on the device: a stored, b removed


# -- ApproxPrefixIndex ----------------------------------------------------------------------------------
def test_approx_index_match_and_lru_bound():
    index = ApproxPrefixIndex(capacity_blocks=4)
    p = [h("p", i) for i in range(3)]
    index.record(W1, p)
    index.record(W2, p[:1])
    assert index.match_blocks(p) == {W1: 3, W2: 1}
    q = [h("q", i) for i in range(2)]
    index.record(W1, q)  # 5 hashes > 4: the LRU one goes, the tail of p (p[2]), not its head
    assert index.num_blocks(W1) == 4
    assert index.match_blocks(p)[W1] == 2 and index.match_blocks(q)[W1] == 2
    index.record(W1, p[:1])  # use refreshes: order now p1, q1, q0, p0 (oldest first)
    index.record(W1, [h("r")])  # evicts p1
    assert index.match_blocks(p)[W1] == 1 and index.match_blocks(q)[W1] == 2
    index.record(W1, [h("s"), h("t")])  # evicts q1 then q0
    assert index.match_blocks(q)[W1] == 0 and index.match_blocks(p)[W1] == 1
    assert index.num_blocks(W1) == 4
    index.remove_worker(W1)
    assert index.workers() == [W2] and index.match_blocks(p) == {W2: 1}


def test_approx_index_long_prompt_keeps_its_head():
    index = ApproxPrefixIndex(capacity_blocks=3)
    p = [h("long", i) for i in range(10)]
    index.record(W1, p)
    assert index.num_blocks(W1) == 3 and index.match_blocks(p) == {W1: 3}
    with pytest.raises(ValueError):
        ApproxPrefixIndex(capacity_blocks=0)


# -- hashes equal the engine's ---------------------------------------------------------------------------
def _stored_hashes(events) -> list[bytes]:
    return [bh for e in events if isinstance(e, BlockStored) for bh in e.block_hashes]


def test_prompt_block_hashes_equal_engine(make_llm):
    llm = make_llm("llama3-gqa")
    engine = llm.llm_engine
    engine.take_kv_events()
    prompt = list(range(10, 60))  # 50 tokens: 3 full blocks of 16
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    expected = prompt_block_hashes(prompt, 16)
    assert len(expected) == 3
    assert _stored_hashes(engine.take_kv_events()) == expected
    # with a cache salt: block 0 is keyed by the salt, and the chain changes from there on
    engine.add_request(None, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1), cache_salt="tenant-a")
    while engine.has_unfinished_requests():
        engine.step()
    salted = prompt_block_hashes(prompt, 16, cache_salt="tenant-a")
    assert _stored_hashes(engine.take_kv_events()) == salted
    assert not set(salted) & set(expected)
    assert prompt_block_hashes(prompt[:15], 16) == []


# -- subscriber against a real publisher -----------------------------------------------------------------
def script(n: int, start: int = 0, tag: str = "", ts0: float = 1000.0) -> list[KVEventBatch]:
    """n batches: each stores two blocks and removes one stored by the previous batch."""
    out = []
    for seq in range(start, start + n):
        events = [stored(h(tag, seq, 0), h(tag, seq, 1))]
        if seq:
            events.append(BlockRemoved([h(tag, seq - 1, 1)]))
        out.append(batch(seq, *events, ts=ts0 + seq))
    return out


def expected_blocks(batches: list[KVEventBatch]) -> frozenset[bytes]:
    index = PrefixIndex()
    for b in batches:
        index.apply(W1, b)
    return index.blocks(W1)


class Harness:
    def __init__(self, tmp_path, secret=b"k", buffer_batches=10_000):
        self.pub_ep, self.replay_ep = f"ipc://{tmp_path}/kv-pub", f"ipc://{tmp_path}/kv-replay"
        self.secret, self.buffer_batches = secret, buffer_batches
        self.ctx = zmq.Context()
        self.pub: KVEventPublisher | None = None
        self.serve_replays = True
        self.start_publisher()

    def start_publisher(self) -> None:
        if self.pub is not None:
            self.pub.close()
        for _ in range(50):  # the old socket's endpoint is released asynchronously
            try:
                self.pub = KVEventPublisher(self.ctx, self.pub_ep, self.replay_ep, self.secret, self.buffer_batches)
                return
            except zmq.ZMQError:
                time.sleep(0.02)
        raise RuntimeError("could not bind the publisher")

    async def replay_loop(self) -> None:
        """What the engine core's loop does for the publisher."""
        while True:
            if self.serve_replays:
                self.pub.serve_replays()
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self.pub.close()
        self.ctx.term()


@contextlib.asynccontextmanager
async def running(harness: Harness, index: PrefixIndex, secret=b"k", replay=True, **kwargs):
    sub = KVEventSubscriber(index, W1, harness.pub_ep, harness.replay_ep if replay else None, secret, **kwargs)
    server = asyncio.create_task(harness.replay_loop())
    task = asyncio.create_task(sub.run())
    await asyncio.sleep(0.3)  # PUB/SUB slow joiner: let the subscription reach the publisher
    try:
        yield sub
    finally:
        sub.close()
        await asyncio.wait_for(task, 2.0)  # close() makes run() return
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def wait_for(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def publish(harness: Harness, batches) -> None:
    for b in batches:
        harness.pub.publish(b)


def test_subscriber_builds_the_published_index(tmp_path):
    harness, index = Harness(tmp_path), PrefixIndex()
    batches = script(5)

    async def main():
        async with running(harness, index) as sub:
            publish(harness, batches)
            await wait_for(lambda: sub.batches == 5)
            assert (sub.gaps, sub.resyncs, sub.bad_macs, sub.degraded) == (0, 0, 0, False)

    try:
        asyncio.run(main())
    finally:
        harness.close()
    assert index.blocks(W1) == expected_blocks(batches) and index.expected_seq(W1) == 5


def test_late_subscriber_catches_up_by_replay(tmp_path):
    harness, index = Harness(tmp_path), PrefixIndex()
    batches = script(4)
    publish(harness, batches[:3])  # nobody listens: only the replay buffer has them

    async def main():
        async with running(harness, index) as sub:
            publish(harness, batches[3:])
            await wait_for(lambda: index.expected_seq(W1) == 4)
            assert (sub.batches, sub.gaps, sub.resyncs, sub.degraded) == (4, 1, 0, False)

    try:
        asyncio.run(main())
    finally:
        harness.close()
    assert index.blocks(W1) == expected_blocks(batches)


def test_wrong_secret_receives_nothing_and_nothing_applied(tmp_path):
    """The publisher's socket refuses the login (ZMQ PLAIN): no batch arrives, signed or not."""
    harness, index = Harness(tmp_path, secret=b"right"), PrefixIndex()

    async def main():
        async with running(harness, index, secret=b"wrong") as sub:
            await asyncio.sleep(0.5)  # a subscriber with the right secret would be connected by now
            publish(harness, script(3))
            await asyncio.sleep(0.5)
            assert sub.batches == sub.bad_macs == sub.gaps == 0

    try:
        asyncio.run(main())
    finally:
        harness.close()
    assert index.workers() == []


def test_publisher_restart(tmp_path):
    harness, index = Harness(tmp_path), PrefixIndex()
    first, second, third = script(3, tag="a"), script(2, tag="b", ts0=2000.0), script(2, tag="c", ts0=3000.0)

    async def main():
        async with running(harness, index) as sub:
            publish(harness, first)
            await wait_for(lambda: index.expected_seq(W1) == 3)
            # a new worker process on the same endpoints: seq back to 0
            harness.start_publisher()
            await asyncio.sleep(0.5)  # the SUB reconnects and resubscribes
            publish(harness, second[:1])
            await wait_for(lambda: sub.restarts == 1)
            assert index.blocks(W1) == expected_blocks(second[:1]) and index.expected_seq(W1) == 1
            publish(harness, second[1:])
            await wait_for(lambda: index.expected_seq(W1) == 2)
            # another restart whose seq 0 nobody heard (published before the SUB reconnected):
            # seq 1 < expected 2 but newer than anything applied -> restart, rebuilt by replay from 0
            harness.start_publisher()
            publish(harness, third[:1])
            await asyncio.sleep(0.5)
            publish(harness, third[1:])
            await wait_for(lambda: sub.restarts == 2 and index.expected_seq(W1) == 2)
            assert (sub.resyncs, sub.degraded) == (0, False)

    try:
        asyncio.run(main())
    finally:
        harness.close()
    assert index.blocks(W1) == expected_blocks(third)


def test_unfillable_gap_resyncs_then_degrades(tmp_path):
    harness, index = Harness(tmp_path, buffer_batches=2), PrefixIndex()
    batches = script(6)
    publish(harness, batches[:5])  # nobody listens; the replay buffer keeps only the last 2 batches

    async def main():
        async with running(harness, index) as sub:
            publish(harness, batches[5:])
            await wait_for(lambda: index.expected_seq(W1) == 6)
            assert (sub.gaps, sub.resyncs, sub.degraded) == (1, 1, True)
            # what the surviving batches (4 and 5) say is kept; earlier blocks are unknown
            assert index.blocks(W1) == expected_blocks(batches[4:])
            # a restart makes the index exact again
            harness.start_publisher()
            await asyncio.sleep(0.5)
            publish(harness, script(1, tag="n", ts0=5000.0))
            await wait_for(lambda: sub.restarts == 1)
            assert not sub.degraded

    try:
        asyncio.run(main())
    finally:
        harness.close()


def test_replay_timeout_and_no_replay_endpoint_degrade(tmp_path):
    harness, index = Harness(tmp_path), PrefixIndex()
    batches = script(3)
    publish(harness, batches[:2])
    harness.serve_replays = False  # the worker never answers replays

    async def main():
        async with running(harness, index, replay_timeout=0.2) as sub:
            publish(harness, batches[2:])
            await wait_for(lambda: sub.degraded)
            assert (sub.gaps, sub.resyncs) == (1, 1) and index.expected_seq(W1) == 3
        index.remove_worker(W1)
        async with running(harness, index, replay=False) as sub:
            publish(harness, script(1, start=3))
            await wait_for(lambda: sub.degraded)
            assert index.blocks(W1) == expected_blocks(script(1, start=3))

    try:
        asyncio.run(main())
    finally:
        harness.close()
