"""Per-request block tables over the block pool, and prefix-cache lookups.

NOTE: a request's blocks cover at least its ``num_computed_tokens`` plus the tokens scheduled this
step; block ``i`` holds token positions ``[i * block_size, (i + 1) * block_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from tandem.engine.request import Request
from tandem.utils import cdiv


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache
    requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already in the cache
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def update_block_hashes(self, request: Request) -> None:
        """Extend the request's chained hashes over every full block of its known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= request.num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            extra = (request.cache_salt,) if (i == 0 and request.cache_salt) else ()
            hashes.append(hash_block_tokens(parent, request.all_token_ids[i * bs:(i + 1) * bs], extra))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a new request: (blocks, number of tokens they hold).

        At least one token is always left to compute, since its logits are needed to sample."""
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        self.update_block_hashes(request)
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[KVCacheBlock] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.get_cached_block(block_hash, request.all_token_ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * bs
        if not request.prefix_queried:  # count each prompt once (not again while it waits, nor on resume)
            request.prefix_queried = True
            self.stats.requests += 1
            self.stats.queries += request.num_tokens
            self.stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed (and newly hit) ones.

        Returns False and changes nothing when the pool cannot supply the blocks."""
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new = max(0, num_required - len(blocks) - len(new_computed_blocks))
        # Hits sitting in the free queue stop being allocatable once we take them.
        num_hits_in_free_queue = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - num_hits_in_free_queue:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        blocks.extend(self.pool.get_new_blocks(num_new))
        return True

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past the first ``num_tokens`` positions (they held only
        rejected draft tokens: never full of computed tokens, so never in the prefix cache)."""
        blocks = self.req_blocks.get(request.request_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks and len(blocks) > keep:
            assert keep >= self.num_cached_blocks.get(request.request_id, 0), "a cached block is never trimmed"
            extra = blocks[keep:]
            del blocks[keep:]
            self.free_blocks(extra)

    def cache_computed_blocks(self, request: Request) -> None:
        """After a step: publish the request's blocks whose tokens are now all computed."""
        if not self.enable_caching:
            return
        rid = request.request_id
        blocks = self.req_blocks.get(rid)
        if not blocks:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self.num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        self.update_block_hashes(request)
        bs = self.block_size
        for i in range(start, num_full):
            parent = request.block_hashes[i - 1] if i else None
            self.pool.cache_full_block(blocks[i], request.block_hashes[i], parent,
                                       request.all_token_ids[i * bs:(i + 1) * bs])
        self.num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so that shared prefixes are evicted last."""
        self.free_blocks(self.detach(request))

    def detach(self, request: Request) -> list[KVCacheBlock]:
        """Take a request's blocks out of its table without freeing them (a lease, or a transfer
        still writing into them); give them back later with ``free_blocks``."""
        self.num_cached_blocks.pop(request.request_id, None)
        return self.req_blocks.pop(request.request_id, [])

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]
