"""Triton attention backend: fused rotary + KV write, split-K paged decode, varlen paged prefill,
and the Triton norm / activation kernels (``ops``). On CPU it runs only under TRITON_INTERPRET=1
(CI's correctness check); on a GPU it is the fast path."""

from __future__ import annotations

import os

import numpy as np
import torch

from tandem.kernels import triton_attention as tri
from tandem.kernels.ops import triton_ops
from tandem.model.attention import AttentionMetadata, WriteThenAttend
from tandem.runner.h2d import to_device


class TritonAttentionBackend(WriteThenAttend):
    name = "triton"

    def __init__(self) -> None:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention backend 'triton' needs a CUDA GPU (on a CPU set TRITON_INTERPRET=1 to "
                             "check it through Triton's interpreter, slowly; or use the 'torch' backend)")
        self.ops = triton_ops()
        self._meta: AttentionMetadata | None = None  # the step whose prefill batch is cached below
        self._prefill_batch: tuple | None = None

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None):
        nd = meta.num_decode_tokens
        if not meta.prefills:
            return tri.paged_decode_attention(query, k_cache, v_cache, meta.decode_block_tables,
                                              meta.decode_seq_lens, scale, sliding_window)
        out = torch.empty_like(query)
        if nd:
            out[:nd] = tri.paged_decode_attention(query[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, scale, sliding_window)
        tables, starts, ctx_lens, max_q = self._prefills(meta, query.device)
        out[nd:] = tri.paged_prefill_attention_varlen(query[nd:], k_cache, v_cache, tables, starts, ctx_lens, scale,
                                                      sliding_window, max_query_len=max_q)
        return out

    def _prefills(self, meta: AttentionMetadata, device: torch.device) -> tuple:
        """The step's prefill chunks as padded batch tensors, built once per step (every layer
        shares them)."""
        if self._meta is not meta:
            seqs, nd = meta.prefills, meta.num_decode_tokens
            width = max(len(s.block_table) for s in seqs)
            tables = np.zeros((len(seqs), width), dtype=np.int64)
            for i, s in enumerate(seqs):
                tables[i, :len(s.block_table)] = s.host_block_table if s.host_block_table is not None \
                    else s.block_table.cpu().numpy()
            starts = [s.query_start - nd for s in seqs] + [seqs[-1].query_start - nd + seqs[-1].query_len]
            ctx = [s.context_len for s in seqs]
            self._prefill_batch = (to_device(tables, device), to_device(starts, device, torch.int32),
                                   to_device(ctx, device, torch.int32), max(s.query_len for s in seqs))
            self._meta = meta
        return self._prefill_batch
