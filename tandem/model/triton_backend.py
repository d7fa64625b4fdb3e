"""Triton attention backend: fused rotary + KV write, split-K paged decode, varlen paged prefill,
and the Triton norm / activation kernels (``ops``). On CPU it runs only under TRITON_INTERPRET=1
(CI's correctness check); on a GPU it is the fast path."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tandem.h2d import to_device
from tandem.kernels import triton_attention as tri
from tandem.kernels.ops import triton_ops
from tandem.kernels.paged_attention import Scale
from tandem.model.attention import (
    AttentionMetadata,
    CommonAttentionMetadata,
    DecodeGraphBuffers,
    WriteThenAttend,
    pad_block_tables,
)


@dataclass
class TritonPrefillBatch:
    """The step's prefill chunks as the varlen kernel takes them (query offsets past the decodes)."""

    block_tables: torch.Tensor  # [num_prefills, widest table] int64, zero-padded
    query_starts: torch.Tensor  # [num_prefills + 1] int32
    context_lens: torch.Tensor  # [num_prefills] int32
    max_query_len: int


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    prefill: TritonPrefillBatch | None = None  # None: a decode-only step


class TritonMetadataBuilder:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def build(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        nd, dev = common.num_decodes, self.device
        prefill = None
        if common.num_seqs > nd:
            starts = common.query_start_loc[nd:] - common.query_start_loc[nd]
            prefill = TritonPrefillBatch(
                block_tables=to_device(pad_block_tables(common.block_tables[nd:]), dev),
                query_starts=to_device(starts, dev, torch.int32),
                context_lens=to_device(common.seq_lens[nd:], dev, torch.int32),
                max_query_len=int((starts[1:] - starts[:-1]).max()),
            )
        return TritonAttentionMetadata(
            slot_mapping=to_device(common.slot_mapping, dev),
            num_decode_tokens=nd,
            decode_block_tables=to_device(pad_block_tables(common.block_tables[:nd]), dev),
            decode_seq_lens=to_device(common.seq_lens[:nd], dev, torch.int64),
            prefill=prefill,
        )

    def decode_graph_buffers(self, max_batch: int, max_blocks: int, pad_slot: int) -> DecodeGraphBuffers:
        """The decode kernel takes its split count from the static table width: no host value per step."""
        return DecodeGraphBuffers(self.device, max_batch, max_blocks, pad_slot, lambda slots, tables, lens:
                                  TritonAttentionMetadata(slots, slots.shape[0], tables, lens))


class TritonAttentionBackend(WriteThenAttend):
    name = "triton"

    def __init__(self) -> None:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention backend 'triton' needs a CUDA GPU (on a CPU set TRITON_INTERPRET=1 to "
                             "check it through Triton's interpreter, slowly; or use the 'torch' backend)")
        self.ops = triton_ops()

    def make_builder(self, device: torch.device) -> TritonMetadataBuilder:
        return TritonMetadataBuilder(device)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None = None,
               fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None, k_scale: Scale = 1.0,
               v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        assert isinstance(meta, TritonAttentionMetadata), "metadata comes from this backend's builder"
        nd, prefill = meta.num_decode_tokens, meta.prefill
        if prefill is None:
            return tri.paged_decode_attention(query, k_cache, v_cache, meta.decode_block_tables,
                                              meta.decode_seq_lens, scale, sliding_window,
                                              k_scale=k_scale, v_scale=v_scale, sinks=sinks)
        out = torch.empty_like(query)
        if nd:
            out[:nd] = tri.paged_decode_attention(query[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, scale, sliding_window,
                                                  k_scale=k_scale, v_scale=v_scale, sinks=sinks)
        out[nd:] = tri.paged_prefill_attention_varlen(query[nd:], k_cache, v_cache, prefill.block_tables,
                                                      prefill.query_starts, prefill.context_lens, scale,
                                                      sliding_window, max_query_len=prefill.max_query_len,
                                                      k_scale=k_scale, v_scale=v_scale, sinks=sinks)
        return out
