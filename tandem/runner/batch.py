"""A step's chunks as one flat batch: their order and their backend-neutral attention description
(shared by the model runner and the drafter)."""

from __future__ import annotations

import numpy as np

from tandem.model.attention import SHORT_QUERY_TOKENS, CommonAttentionMetadata
from tandem.scheduler_output import ScheduledChunk


def batch_order(chunk: ScheduledChunk) -> tuple[bool, bool, int]:
    """Sort key: decodes first, then short queries (drafts; backends may run them as decode rows),
    then the rest; longest context first within each (so decode groups can pad to their width)."""
    n = len(chunk.token_ids)
    return n != 1, n > SHORT_QUERY_TOKENS, -len(chunk.block_ids)


def describe_chunks(chunks: list[ScheduledChunk], block_size: int) -> tuple[CommonAttentionMetadata, np.ndarray]:
    """The step's attention description, and the flat positions (host). ``chunks`` in batch order."""
    lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start_loc[1:])
    positions = np.concatenate([np.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in chunks])
    slots = np.empty_like(positions)
    for c, start, n in zip(chunks, query_start_loc, lens):
        table = np.asarray(c.block_ids, dtype=np.int64)
        pos = positions[start:start + n]
        slots[start:start + n] = table[pos // block_size] * block_size + pos % block_size
    common = CommonAttentionMetadata(
        num_decodes=int(np.count_nonzero(lens == 1)),  # decodes come first
        query_start_loc=query_start_loc,
        seq_lens=np.array([c.start_pos + len(c.token_ids) for c in chunks], dtype=np.int64),
        block_tables=[c.block_ids for c in chunks],
        slot_mapping=slots,
    )
    return common, positions
