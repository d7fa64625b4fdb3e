"""Block pool: fixed-size KV cache blocks, reference counts, and the prefix cache.

NOTE (invariants, checked by ``check_invariants``):
- a block with ``ref_cnt == 0`` is in the free queue exactly once; a block with ``ref_cnt > 0`` is not;
- a block is in ``cached`` iff it has a ``block_hash``, and ``cached[h]`` is that block;
- free blocks that still carry a hash are reusable by a prefix-cache hit until they are popped
  for a new allocation, which evicts them: least recently freed first (LRU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import msgspec

from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """Chained, strong (sha256) hash of one full block: equal hashes mean equal prefixes."""
    payload = _encoder.encode((parent_hash or b"", list(token_ids), list(extra_keys)))
    return hashlib.sha256(payload).digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit token by token
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) popleft, append and remove from the middle."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise RuntimeError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block not in free queue"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def __iter__(self):
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}
        self._events: list[KVEvent] = []

    # -- allocation ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free-but-cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue in the given order,
        so the first given is the first evicted (callers pass a request's tail first)."""
        for block in blocks_in_eviction_order:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    # -- prefix cache ---------------------------------------------------------------------------
    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None  # a miss, or a hash collision caught by the token check
        return block

    def cache_full_block(self, block: KVCacheBlock, block_hash: bytes, parent_hash: bytes | None,
                         token_ids: Sequence[int]) -> bool:
        """Register a block whose ``block_size`` tokens are computed. Returns False (and leaves the
        block uncached) when another block already holds the same content."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        self._events.append(BlockStored([block_hash], parent_hash, list(token_ids), self.block_size))
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        self._events.append(BlockRemoved([block.block_hash]))
        block.block_hash = None
        block.token_ids = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only allowed when no request holds a block."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def check_invariants(self) -> None:
        in_queue = {b.block_id for b in self.free_queue}
        assert len(in_queue) == self.free_queue.num_free, "free queue count drifted"
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in in_queue), block
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) is block, block
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)

    def assert_idle(self) -> None:
        """When no request is in flight: every block is free and every reference count is 0."""
        self.check_invariants()
        assert self.num_free_blocks == self.num_blocks, f"{self.num_blocks - self.num_free_blocks} blocks leaked"
        assert all(b.ref_cnt == 0 for b in self.blocks)

