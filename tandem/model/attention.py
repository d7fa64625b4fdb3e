"""Attention backend seam: the runner's backend-neutral step description, per-backend metadata
builders, and backends chosen by name from a registry.

The runner orders a step's sequences decodes first (one query token each), then prefill chunks,
and describes the step once as a ``CommonAttentionMetadata`` (host arrays only). The backend's
``AttentionMetadataBuilder`` turns that into the backend's own ``AttentionMetadata`` (device
tensors in the layout its kernels take), once per step; every attention layer reads it and its own
KV cache. For CUDA-graph decode the builder also owns the static metadata buffers
(``DecodeGraphBuffers``), as vLLM's ``AttentionMetadataBuilder`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tandem.h2d import copy_into, to_device
from tandem.kernels import paged_attention as ref
from tandem.kernels.kv_quant import is_fp8
from tandem.kernels.ops import TORCH_OPS, Ops
from tandem.kernels.paged_attention import Scale


@dataclass
class CommonAttentionMetadata:
    """One step as the runner describes it to every backend: host arrays, nothing uploaded.

    Sequences are ordered decodes first: the first ``num_decodes`` have one query token each."""

    num_decodes: int
    query_start_loc: np.ndarray  # [num_seqs + 1] int64: sequence i's tokens are [start[i], start[i + 1])
    seq_lens: np.ndarray  # [num_seqs] int64 context length: cached prefix + this step's tokens
    block_tables: list[list[int]]  # per sequence, its block ids (one row each, ragged)
    slot_mapping: np.ndarray  # [num_tokens] int64 flat KV slot of every token in the step

    @property
    def num_seqs(self) -> int:
        return len(self.block_tables)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


@dataclass
class AttentionMetadata:
    """What every backend's metadata holds; a backend's builder adds what its kernels need."""

    slot_mapping: torch.Tensor  # [num_tokens] flat KV slot of every token in the step
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, zero-padded
    decode_seq_lens: torch.Tensor  # [num_decodes] int64


def pad_block_tables(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """Ragged block tables -> [len(tables), width] int64, zero-padded (width: the widest row)."""
    if width is None:
        width = max((len(t) for t in tables), default=0)
    arr = np.zeros((len(tables), width), dtype=np.int64)
    for i, t in enumerate(tables):
        arr[i, :len(t)] = t
    return arr


class DecodeGraphBuffers:
    """Static metadata tensors of a CUDA-graph decode, sized for the largest captured batch.

    ``fill`` copies a decode-only step into them (no host sync) and pads the rows past it: context
    length 0 (they attend to nothing) and KV slots in the scratch block; ``metadata(bs)`` is the
    backend's metadata over views of them, the same tensors at every replay."""

    def __init__(self, device: torch.device, max_batch: int, max_blocks: int, pad_slot: int,
                 make: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], AttentionMetadata]) -> None:
        self.pad_slot, self.max_blocks, self._make = pad_slot, max_blocks, make
        self.slots = torch.full((max_batch,), pad_slot, dtype=torch.int64, device=device)
        self.tables = torch.zeros((max_batch, max_blocks), dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros((max_batch,), dtype=torch.int64, device=device)

    def fill(self, common: CommonAttentionMetadata, bs: int) -> None:
        n = common.num_seqs
        assert common.num_decodes == n, "a graph step holds decodes only"
        copy_into(self.slots[:n], torch.from_numpy(common.slot_mapping))
        copy_into(self.seq_lens[:n], torch.from_numpy(common.seq_lens))
        # NOTE: only this batch's width is written: a kernel reads a row's table only below its
        # context length, so entries past it (left by an earlier, longer sequence) are never read
        padded = pad_block_tables(common.block_tables)
        copy_into(self.tables[:n, :padded.shape[1]], torch.from_numpy(padded))
        # NOTE: padding rows attend to nothing (length 0) and write their KV to the scratch block
        self.slots[n:bs].fill_(self.pad_slot)
        self.seq_lens[n:bs].zero_()

    def metadata(self, bs: int) -> AttentionMetadata:
        return self._make(self.slots[:bs], self.tables[:bs], self.seq_lens[:bs])


class AttentionMetadataBuilder(Protocol):
    def build(self, common: CommonAttentionMetadata) -> AttentionMetadata:
        """The step's metadata for this backend's kernels, uploaded once and shared by all layers."""
        ...

    def decode_graph_buffers(self, max_batch: int, max_blocks: int, pad_slot: int) -> DecodeGraphBuffers:
        """Static metadata buffers for decode-only steps of up to max_batch sequences (CUDA graphs)."""
        ...


class AttentionBackend(Protocol):
    name: str
    ops: Ops  # the norm / activation / rotary kernels this backend pairs with

    def make_builder(self, device: torch.device) -> AttentionMetadataBuilder:
        ...

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None = None, k_scale: Scale = 1.0,
                v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, heads, head_dim], key/value [T, kv_heads, head_dim] -> [T, heads, head_dim].
        Writes this step's key/value into the cache before attending. With a sliding window a token
        attends to itself and the ``sliding_window - 1`` positions before it. k_scale/v_scale: the
        layer's FP8 scales (fp32 [1] tensors), used only when the cache is FP8. sinks: [heads], one
        more logit per head in the softmax's denominator (gpt-oss; ``paged_attention``)."""
        ...

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None = None,
               fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None, k_scale: Scale = 1.0,
               v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """As ``forward`` when this step's key/value are already in the cache (fused rotary + write).
        fresh_kv: those keys and values as written, for a backend that can use them directly
        (never with an FP8 cache, which holds a rounded copy of them)."""
        ...


class WriteThenAttend:
    """``forward`` for backends that store this step's key/value with the reference copy."""

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None = None,
               fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None, k_scale: Scale = 1.0,
               v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, k_scale: Scale = 1.0, v_scale: Scale = 1.0,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        ref.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        fresh = None if is_fp8(k_cache.dtype) else (key, value)  # an FP8 cache holds a rounded copy
        return self.attend(query, k_cache, v_cache, meta, scale, sliding_window, fresh, k_scale, v_scale, sinks)


# -- torch reference backend ---------------------------------------------------------------------------
@dataclass
class PrefillSeq:
    query_start: int  # offset of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # cached prefix + this chunk
    block_table: torch.Tensor  # [num_blocks] int64, on the device


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Decodes sorted by context length, split into (start, end, num_blocks) runs; the backend pads
    # each run's block tables only to its own width. None: one run over all decodes.
    decode_groups: list[tuple[int, int, int]] | None = None


def decode_groups(num_blocks: list[int], max_waste: float = 0.25) -> list[tuple[int, int, int]]:
    """Split decodes (sorted by block count, descending) into (start, end, width) runs in which no
    sequence pads more than ``max_waste`` of the run's widest block table."""
    groups: list[tuple[int, int, int]] = []
    start = 0
    for i, n in enumerate(num_blocks):
        width = num_blocks[start]
        if n < (1 - max_waste) * width:
            groups.append((start, i, width))
            start = i
    if num_blocks:
        groups.append((start, len(num_blocks), num_blocks[start]))
    return groups


# A query of at most this many tokens right after the decodes (a chunk with draft tokens, a short
# last prompt chunk) may run as that many decode rows: row j attends to the context up to its own
# position, which is causal attention over the cached prefix, read in place.
SHORT_QUERY_TOKENS = 8


class TorchMetadataBuilder:
    """group_decodes: split decodes into runs of similar table width (``decode_groups``), for a
    decode kernel that pads every row of a run to the run's widest table. short_queries_as_decodes:
    the sequences of at most SHORT_QUERY_TOKENS tokens that directly follow the decodes become
    one decode row per token (for a decode kernel that reads blocks in place)."""

    def __init__(self, device: torch.device, group_decodes: bool = True, short_queries_as_decodes: bool = False) -> None:
        self.device, self.group_decodes = device, group_decodes
        self.short_queries_as_decodes = short_queries_as_decodes

    def build(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        starts, dev = common.query_start_loc, self.device
        decode_tables, decode_lens, first_prefill = self._decode_rows(common)
        prefills = [PrefillSeq(int(starts[i]), int(starts[i + 1] - starts[i]), int(common.seq_lens[i]),
                               to_device(np.asarray(common.block_tables[i], dtype=np.int64), dev))
                    for i in range(first_prefill, common.num_seqs)]
        return TorchAttentionMetadata(
            slot_mapping=to_device(common.slot_mapping, dev),
            num_decode_tokens=len(decode_tables),
            decode_block_tables=to_device(pad_block_tables(decode_tables), dev),
            decode_seq_lens=to_device(np.asarray(decode_lens, dtype=np.int64), dev, torch.int64),
            prefills=prefills,
            decode_groups=decode_groups([len(t) for t in decode_tables]) if self.group_decodes else None,
        )

    def _decode_rows(self, common: CommonAttentionMetadata) -> tuple[list[list[int]], list[int], int]:
        """(block table and context length of each decode row, the first sequence left as a prefill).
        NOTE: decode row r is query row r, so only sequences directly after the decodes qualify."""
        nd, starts = common.num_decodes, common.query_start_loc
        tables, lens = list(common.block_tables[:nd]), [int(n) for n in common.seq_lens[:nd]]
        i = nd
        while self.short_queries_as_decodes and i < common.num_seqs:
            q = int(starts[i + 1] - starts[i])
            if q > SHORT_QUERY_TOKENS:
                break
            end = int(common.seq_lens[i])
            tables.extend([common.block_tables[i]] * q)
            lens.extend(range(end - q + 1, end + 1))
            i += 1
        return tables, lens, i

    def decode_graph_buffers(self, max_batch: int, max_blocks: int, pad_slot: int) -> DecodeGraphBuffers:
        return DecodeGraphBuffers(self.device, max_batch, max_blocks, pad_slot, lambda slots, tables, lens:
                                  TorchAttentionMetadata(slots, slots.shape[0], tables, lens))


class TorchAttentionBackend(WriteThenAttend):
    """Reference backend: gather from the paged cache + scaled_dot_product_attention."""

    name = "torch"
    ops = TORCH_OPS

    def __init__(self) -> None:
        self.workspace = ref.GatherWorkspace()  # shared by all layers: they run one after another

    def make_builder(self, device: torch.device) -> TorchMetadataBuilder:
        return TorchMetadataBuilder(device)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None = None,
               fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None, k_scale: Scale = 1.0,
               v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """fresh_kv: this step's keys and values (as written to the cache); a prompt chunk with no
        cached prefix attends to them directly instead of gathering them back from the cache."""
        assert isinstance(meta, TorchAttentionMetadata), "metadata comes from this backend's builder"
        out = torch.empty_like(query)
        nd = meta.num_decode_tokens
        groups = meta.decode_groups if meta.decode_groups is not None else \
            [(0, nd, meta.decode_block_tables.shape[1])] if nd else []
        for start, end, width in groups:
            out[start:end] = self._decode_attention(
                query[start:end], k_cache, v_cache, meta.decode_block_tables[start:end, :width],
                meta.decode_seq_lens[start:end], scale, sliding_window, k_scale, v_scale, sinks)
        for seq in meta.prefills:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            own = (fresh_kv[0][rows], fresh_kv[1][rows]) if fresh_kv else None  # used when no prefix
            out[rows] = ref.paged_prefill_attention(query[rows], k_cache, v_cache, seq.block_table, seq.context_len,
                                                    scale, self.workspace, sliding_window, own, k_scale, v_scale,
                                                    sinks)
        return out

    def _decode_attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          sliding_window: int | None, k_scale: Scale, v_scale: Scale,
                          sinks: torch.Tensor | None) -> torch.Tensor:
        return ref.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, self.workspace,
                                          sliding_window, k_scale, v_scale, sinks)


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with tandem's C++ CPU kernels (``tandem.kernels.cpu_kernels``): decodes
    read K/V blocks in place, and the layer's norms, activation and rotary + KV write are one pass
    each; prompt chunks keep the reference attention (own K/V, or gather + SDPA after a prefix)."""

    name = "cpu"

    def __init__(self) -> None:
        from tandem.kernels import cpu_kernels  # not at import: `python -m tandem.kernels.cpu_kernels` builds it

        if not cpu_kernels.available():
            raise RuntimeError("attention backend 'cpu': tandem's C++ CPU kernels could not be built here "
                               "(see the warning above); use 'torch'")
        self.ops = cpu_kernels.cpu_ops()
        self._paged_decode = cpu_kernels.paged_decode_attention
        super().__init__()

    def make_builder(self, device: torch.device) -> TorchMetadataBuilder:
        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on a CPU, not on {device}")
        # all decodes in one call: the kernel reads each row only up to its own context length;
        # short queries too, one row per token (no gather of their context)
        return TorchMetadataBuilder(device, group_decodes=False, short_queries_as_decodes=True)

    def _decode_attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          sliding_window: int | None, k_scale: Scale, v_scale: Scale,
                          sinks: torch.Tensor | None) -> torch.Tensor:
        return self._paged_decode(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                  k_scale, v_scale, sinks)


def _triton_backend() -> AttentionBackend:
    from tandem.model.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": TorchAttentionBackend, "cpu": CpuAttentionBackend, "triton": _triton_backend}


def get_backend(name: str = "torch") -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
