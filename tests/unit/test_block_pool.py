"""Block pool, prefix cache and KV events: plain data, no model."""

import pytest

from tandem.engine.block_pool import BlockPool, hash_block_tokens
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tandem.engine.request import Request
from tandem.sampling_params import SamplingParams


def make_req(rid, tokens, salt=None):
    return Request(rid, tokens, SamplingParams(max_tokens=8), cache_salt=salt, max_tokens=8)


def test_hash_is_chained_and_strong():
    h1 = hash_block_tokens(None, [1, 2, 3, 4])
    assert len(h1) == 32 and h1 == hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(h1, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(None, [1, 2, 3, 4], ("salt",)) != h1


def test_free_queue_lru_order_and_eviction_events():
    pool = BlockPool(4, block_size=2)
    a, b = pool.get_new_blocks(2)
    assert pool.num_free_blocks == 2
    assert pool.cache_full_block(a, b"h" * 32, None, [1, 2])
    pool.free_blocks([b, a])  # b first: evicted first
    pool.check_invariants()
    assert [blk.block_id for blk in pool.free_queue][-2:] == [b.block_id, a.block_id]
    # three allocations pop the two never-used blocks, then b; a (cached) survives
    got = pool.get_new_blocks(3)
    assert a not in got and pool.cached.get(b"h" * 32) is a
    (last,) = pool.get_new_blocks(1)
    assert last is a and not pool.cached
    events = pool.take_events()
    assert isinstance(events[0], BlockStored) and isinstance(events[-1], BlockRemoved)
    pool.free_blocks(got + [last])
    pool.assert_idle()


def test_double_free_is_caught():
    pool = BlockPool(2, block_size=2)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(AssertionError):
        pool.free_blocks([a])


def test_token_check_rejects_a_hash_collision():
    pool = BlockPool(2, block_size=2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_block(a, b"x" * 32, None, [1, 2])
    assert pool.get_cached_block(b"x" * 32, [1, 2]) is a
    assert pool.get_cached_block(b"x" * 32, [9, 9]) is None


def test_prefix_hit_shares_blocks_and_counts_stats():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = make_req("a", list(range(10)))
    hits, n = kv.get_computed_blocks(first)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_computed_blocks(first)  # blocks 0 and 1 are full, block 2 holds 2 tokens
    second = make_req("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(second)
    assert n == 8 and [b.block_id for b in hits] == kv.get_block_ids("a")[:2]
    assert kv.allocate_slots(second, 3, hits)
    assert all(b.ref_cnt == 2 for b in hits)
    assert kv.stats.hits == 8 and kv.stats.queries == 21
    kv.free(first)
    kv.free(second)
    kv.pool.assert_idle()
    assert len(kv.pool.cached) == 2  # still reusable after both finished


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    b = make_req("b", list(range(8)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4  # the last block is recomputed so that a logit exists to sample from
    kv.free(a)


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(9)), salt="tenant-1")
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_computed_blocks(a)
    assert kv.get_computed_blocks(make_req("b", list(range(9)), salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(make_req("c", list(range(9)), salt="tenant-1"))[1] == 8
    kv.free(a)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.pool.num_free_blocks == 2 and "a" not in kv.req_blocks


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    r = make_req("a", [1, 2, 3])
    kv.allocate_slots(r, 3)
    r.num_computed_tokens = 3
    kv.cache_computed_blocks(r)
    assert not kv.pool.reset_prefix_cache()
    kv.free(r)
    assert kv.pool.reset_prefix_cache()
    assert isinstance(kv.pool.take_events()[-1], AllBlocksCleared)
    kv.pool.assert_idle()
