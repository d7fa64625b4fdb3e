"""Attention backend seam: per-step metadata plus backends chosen by name from a registry.

The runner orders a step's sequences decodes first (one query token each), then prefill chunks,
and builds one ``AttentionMetadata``; every attention layer reads it and its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from tandem.kernels import paged_attention as ref
from tandem.kernels.ops import TORCH_OPS, Ops


@dataclass
class PrefillSeq:
    query_start: int  # offset of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # cached prefix + this chunk
    block_table: torch.Tensor  # [num_blocks] int64, on the device
    host_block_table: np.ndarray | None = None  # the same on the host (read without a device sync)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat KV slot of every token in the step
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor  # [num_decodes]
    prefills: list[PrefillSeq]
    # Decodes sorted by context length, split into (start, end, num_blocks) runs; a backend that pads
    # block tables may pad each run only to its own width. None: one run over all decodes.
    decode_groups: list[tuple[int, int, int]] | None = None


class AttentionBackend(Protocol):
    name: str
    ops: Ops  # the norm / activation / rotary kernels this backend pairs with

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """query [T, heads, head_dim], key/value [T, kv_heads, head_dim] -> [T, heads, head_dim].
        Writes this step's key/value into the cache before attending. With a sliding window a token
        attends to itself and the ``sliding_window - 1`` positions before it."""
        ...

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """As ``forward`` when this step's key/value are already in the cache (fused rotary + write)."""
        ...


class WriteThenAttend:
    """``forward`` for backends that store this step's key/value with the reference copy."""

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None):
        ref.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        return self.attend(query, k_cache, v_cache, meta, scale, sliding_window)


class TorchAttentionBackend(WriteThenAttend):
    """Reference backend: gather from the paged cache + scaled_dot_product_attention."""

    name = "torch"
    ops = TORCH_OPS

    def __init__(self) -> None:
        self.workspace = ref.GatherWorkspace()  # shared by all layers: they run one after another

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None):
        out = torch.empty_like(query)
        nd = meta.num_decode_tokens
        groups = meta.decode_groups if meta.decode_groups is not None else \
            [(0, nd, meta.decode_block_tables.shape[1])] if nd else []
        for start, end, width in groups:
            out[start:end] = ref.paged_decode_attention(
                query[start:end], k_cache, v_cache, meta.decode_block_tables[start:end, :width],
                meta.decode_seq_lens[start:end], scale, self.workspace, sliding_window)
        for seq in meta.prefills:
            q = query[seq.query_start:seq.query_start + seq.query_len]
            out[seq.query_start:seq.query_start + seq.query_len] = ref.paged_prefill_attention(
                q, k_cache, v_cache, seq.block_table, seq.context_len, scale, self.workspace, sliding_window)
        return out


def _triton_backend() -> AttentionBackend:
    from tandem.model.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchAttentionBackend, "triton": _triton_backend}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _BACKENDS[name] = factory


def get_backend(name: str = "torch") -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
