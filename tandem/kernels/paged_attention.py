"""Paged attention, torch reference implementations.

KV cache layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token at
position ``p`` of a request lives in block ``block_table[p // block_size]`` at offset
``p % block_size``, i.e. flat slot ``block_id * block_size + offset``.

These are the references a GPU (Triton) backend must match; on CPU they are also the fast path.

FP8 caches (``kv_quant``): this step's K/V are quantized with the layer's ``k_scale``/``v_scale``
on write, and gathered pages are dequantized to the query's dtype on read.

Attention sinks (gpt-oss): ``sinks`` [heads] is one more logit per head in every softmax's
denominator, attached to no value: a query can put weight on "nothing". The references run SDPA
over one more key, all zeros with a zero value, whose score is the sink (an additive mask term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.kv_quant import dequantize, is_fp8, quantize, store

Scale = torch.Tensor | float


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: Scale = 1.0, v_scale: Scale = 1.0) -> None:
    """key/value: [T, kv_heads, head_dim] written at flat slots ``slot_mapping`` [T] (quantized
    with k_scale/v_scale when the cache is FP8)."""
    if is_fp8(k_cache.dtype):
        key, value = quantize(key, k_scale, k_cache.dtype), quantize(value, v_scale, v_cache.dtype)
    store(k_cache, slot_mapping, key)
    store(v_cache, slot_mapping, value)


class GatherWorkspace:
    """Reusable output buffers for ``gather_kv``, grown on demand and never shrunk.

    On CPU a fresh multi-megabyte tensor per gather costs more in page faults than the copy
    itself (measured ~8x on index_select), so the reference backend gathers into these."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        key = (role, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, kv_heads, max_blocks * block_size, head_dim] (a view of
    ``out`` [B * max_blocks, block_size, kv_heads, head_dim] when given)."""
    b, nb = block_tables.shape
    _, bs, h, d = cache.shape
    # NOTE: index_select on dim 0 copies whole blocks; ~2.5x faster on CPU than cache[block_tables].
    # FP8 blocks are copied as bytes (not every device's index_select takes FP8)
    src = _as_bytes_if_fp8(cache)
    flat = torch.index_select(src, 0, block_tables.reshape(-1), out=_as_bytes_if_fp8(out)) if out is not None \
        else src.index_select(0, block_tables.reshape(-1))
    return flat.view(cache.dtype).view(b, nb * bs, h, d).transpose(1, 2)


def _as_bytes_if_fp8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def _gather_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 workspace: GatherWorkspace | None, dtype: torch.dtype, k_scale: Scale,
                 v_scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tables' blocks in ``dtype`` (FP8 pages dequantized)."""
    if workspace is None:
        keys, values = gather_kv(k_cache, block_tables), gather_kv(v_cache, block_tables)
    else:
        shape = (block_tables.numel(), *k_cache.shape[1:])
        keys = gather_kv(k_cache, block_tables, workspace.get("k", shape, k_cache))
        values = gather_kv(v_cache, block_tables, workspace.get("v", shape, v_cache))
    if is_fp8(k_cache.dtype):
        keys, values = dequantize(keys, k_scale, dtype), dequantize(values, v_scale, dtype)
    return keys, values


def attention_with_sinks(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                         scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """query [B, heads, q, d], keys/values [B, kv_heads, L, d], mask bool ([q, L] or [B or 1, 1, q, L]),
    sinks [heads] -> [B, heads, q, d]: attention whose softmax has the sink as one more term."""
    b, kv_heads, length, d = keys.shape
    heads, q = query.shape[1], query.shape[2]
    zero = keys.new_zeros(b, kv_heads, 1, d)
    keys, values = torch.cat([keys, zero], dim=2), torch.cat([values, zero], dim=2)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    bias = torch.zeros(mask.shape[0], heads, q, length + 1, dtype=query.dtype, device=query.device)
    bias[..., :length].masked_fill_(~mask, float("-inf"))
    bias[..., length] = sinks.to(query.dtype).view(1, heads, 1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale,
                                          enable_gqa=kv_heads != heads)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
            sinks: torch.Tensor | None) -> torch.Tensor:
    """SDPA (mask None: causal over the square), or the explicit softmax when there are sinks."""
    if sinks is not None:
        if mask is None:
            n = query.shape[2]
            mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        return attention_with_sinks(query, keys, values, mask, scale, sinks)
    gqa = keys.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           workspace: GatherWorkspace | None = None,
                           sliding_window: int | None = None, k_scale: Scale = 1.0,
                           v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence attending to its whole context (or its last ``sliding_window``
    positions, itself included).

    query [B, heads, head_dim]; block_tables [B, max_blocks]; seq_lens [B] (context incl. the query)
    -> [B, heads, head_dim]."""
    keys, values = _gather_pair(k_cache, v_cache, block_tables, workspace, query.dtype, k_scale, v_scale)
    positions = torch.arange(keys.shape[2], device=query.device)
    mask = positions[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        mask &= positions[None, :] >= seq_lens[:, None] - sliding_window
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    return _attend(query.unsqueeze(2), keys, values, mask, scale, sinks).squeeze(2)


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, context_len: int, scale: float,
                            workspace: GatherWorkspace | None = None,
                            sliding_window: int | None = None,
                            own_kv: tuple[torch.Tensor, torch.Tensor] | None = None, k_scale: Scale = 1.0,
                            v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk of ``q_len`` new tokens of one sequence, after ``context_len - q_len`` cached ones,
    attending causally to the cached prefix and to itself. ``own_kv``: with no cached prefix, the
    chunk's own keys and values [q_len, kv_heads, head_dim] (what the cache holds for it), used as
    they are instead of gathered back from the cache.

    query [q_len, heads, head_dim]; block_table [num_blocks] -> [q_len, heads, head_dim]."""
    q_len = query.shape[0]
    # NOTE: an FP8 cache holds a rounded copy of own_kv: the chunk reads the cache like every later
    # step (and every backend) does, so a prompt sees the same keys its continuation will
    if own_kv is not None and q_len == context_len and not is_fp8(k_cache.dtype):
        keys, values = (t.transpose(0, 1).unsqueeze(0) for t in own_kv)  # [1, kv_heads, q_len, head_dim]
    else:
        keys, values = _gather_pair(k_cache, v_cache, block_table[None], workspace, query.dtype, k_scale, v_scale)
        keys, values = keys[..., :context_len, :], values[..., :context_len, :]
    q = query.transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, head_dim]
    mask = None  # causal over the chunk itself
    if q_len != context_len or (sliding_window is not None and sliding_window < context_len):
        q_pos = torch.arange(context_len - q_len, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return _attend(q, keys, values, mask, scale, sinks).squeeze(0).transpose(0, 1)
