"""Decode steps replayed from CUDA graphs captured at a fixed set of batch sizes.

A decode-only step of ``n`` sequences runs at the smallest captured size ``>= n``: its inputs are
copied into static buffers and the rows past ``n`` are padding (token 0 at position 0, context
length 0, KV written to the scratch block the runner keeps past the pool's blocks), so a replay
never touches a block a request owns. Larger batches and steps with a prefill run eagerly.

Graphs are captured largest first into one memory pool (a smaller graph reuses the larger one's
memory). The attention backend's builder owns the static metadata buffers (``DecodeGraphBuffers``)
and must need no host value per step: the Triton backend takes the split count from the static
block-table width. Without CUDA (CI) ``capture=False`` runs the same
padded static-buffer path eagerly, which is how the padding is tested on a CPU.
"""

from __future__ import annotations

import logging

import torch

from tandem.h2d import copy_into
from tandem.model.attention import AttentionMetadataBuilder, CommonAttentionMetadata
from tandem.model.interface import CausalLM

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """1, 2, 4, 8, then every 16 up to min(max_num_seqs, limit), as vLLM captures."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    return sizes if sizes and sizes[-1] >= top else sizes + [top]


class DecodeGraphs:
    def __init__(self, model: CausalLM, builder: AttentionMetadataBuilder, device: torch.device, sizes: list[int],
                 max_blocks_per_seq: int, block_size: int, scratch_block: int, capture: bool = True) -> None:
        self.model, self.device, self.sizes = model, device, sorted(sizes)
        self.block_size, self.max_blocks = block_size, max_blocks_per_seq
        top = self.sizes[-1]
        self.input_ids = torch.zeros((top,), dtype=torch.int64, device=device)
        self.positions = torch.zeros((top,), dtype=torch.int64, device=device)
        # slot mapping, block tables and context lengths: the attention backend's static metadata
        self.meta = builder.decode_graph_buffers(top, max_blocks_per_seq, pad_slot=scratch_block * block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps = 0  # decode steps run through the static buffers
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, num_seqs: int, widest_table: int) -> bool:
        return num_seqs <= self.max_batch and widest_table <= self.max_blocks

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.meta.metadata(bs))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller graphs fit in its pool
            self._forward(bs)  # compiles the kernels and settles the allocator outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, common: CommonAttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of one decode step of n sequences (their KV is written)."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.steps += 1
        copy_into(self.input_ids[:n], input_ids)
        copy_into(self.positions[:n], positions)
        self.meta.fill(common, bs)
        # NOTE: padding rows are token 0 at position 0
        self.input_ids[n:bs].zero_()
        self.positions[n:bs].zero_()
        if bs in self.graphs:
            graph, out = self.graphs[bs]
            graph.replay()
            return out[:n]
        return self._forward(bs)[:n]
