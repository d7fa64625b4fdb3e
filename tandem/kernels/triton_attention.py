"""Paged attention in Triton: split-K decode (flash-decoding) and variable-length prefill/extend
over a paged cached prefix. Same cache layout and semantics as the torch references in
``paged_attention.py`` (``[num_blocks, block_size, kv_heads, head_dim]``; slot = block * size +
offset; a sliding window lets a token see itself and the ``window - 1`` positions before it).

Both kernels gather K/V token by token through the block table (``block_table[pos // block_size]``),
so any block size works, and a kernel tile may span several blocks. GQA: a decode program serves
all query heads of one KV head, so each K/V tile is loaded once per group.

Attention sinks (gpt-oss, ``sinks`` [heads]): one more logit per head in the softmax's denominator.
The prefill kernel starts each row's running softmax from it (max = sink, normaliser = 1, no
value); the decode reduction counts it once, as one more split with nothing in it.

FP8 caches (``kv_quant``): K/V tiles are loaded as FP8 and dequantized to the query's dtype
(``fp8 * scale``, the scale read from its fp32 [1] tensor, so a CUDA graph sees its current value)
before the dots, which accumulate in fp32 as for any cache.

Runs on NVIDIA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (how CI checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.kv_quant import is_fp8
from tandem.kernels.paged_attention import Scale


@triton.jit
def _load_kv(ptr, offs, mask, scale_ptr, dtype: tl.constexpr, FP8: tl.constexpr):
    """A K or V tile in ``dtype``: as stored, or an FP8 tile times the layer's scale."""
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if FP8:
        x = (x.to(tl.float32) * tl.load(scale_ptr)).to(dtype)
    return x


def scale_tensor(scale: Scale, device: torch.device) -> torch.Tensor:
    """A kernel's scale argument: the layer's fp32 [1] tensor, or one made from a float (tests)."""
    if isinstance(scale, torch.Tensor):
        return scale
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one tile of scores s [rows, tile] (masked to -inf) and values v [tile, d] into the running
    max m_i, normaliser l_i and output acc. A row whose scores are all -inf so far keeps m_i -inf,
    l_i 0 and acc 0 (no exp(-inf - -inf) NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l_i, acc


# NOTE: values that change from step to step (table width, split count, window) are not
# specialized on (Triton compiles a variant for 1 and for multiples of 16): no compile mid-run
@triton.jit(do_not_specialize=["stride_bt", "num_splits", "window"])
def _decode_split_kernel(Q, K, V, block_tables, seq_lens, part_out, part_lse, scale, k_scale, v_scale,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                         stride_pb, stride_ph, stride_ps, num_heads, num_splits, window,
                         GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                         PRECISION: tl.constexpr, FP8: tl.constexpr, HEAD_BLOCKS: tl.constexpr):
    b, head_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh, first_head = head_block // HEAD_BLOCKS, head_block % HEAD_BLOCKS * ROWS  # ROWS of the group's heads
    seq_len = tl.load(seq_lens + b).to(tl.int32)  # int32 throughout: a branch may not change a type
    first = 0  # the first visible position
    if window > 0:
        first = tl.maximum(seq_len - window, 0)
    # NOTE: splits divide this sequence's visible span (not the table's width), so a short context
    # in a wide table still spreads over every split; the grid stays fixed for CUDA graphs
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), TILE) * TILE
    lo = first + split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)
    # up to ROWS (>= 16) of the GROUP query heads of this KV head are the rows of a tensor-core dot
    heads = kvh * GROUP + first_head + tl.arange(0, ROWS)
    head_ok = first_head + tl.arange(0, ROWS) < GROUP
    d = tl.arange(0, D_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    if not FP8:  # NOTE: an FP8 cache is dequantized to the query's dtype instead
        q = q.to(K.dtype.element_ty)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_P2], tl.float32)
    start = (lo // TILE) * TILE
    for t0 in range(start, hi, TILE):
        pos = t0 + tl.arange(0, TILE)
        pos_ok = (pos >= lo) & (pos < hi)
        block = tl.load(block_tables + b * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        offs = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = _load_kv(K, offs[:, None] + d[None, :], kv_mask, k_scale, q.dtype, FP8)
        v = _load_kv(V, offs[:, None] + d[None, :], kv_mask, v_scale, q.dtype, FP8)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [ROWS, TILE]
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = b * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(part_out + base[:, None] + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    tl.store(part_lse + (b * num_heads + heads) * num_splits + split, lse, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_out, part_lse, Out, Sinks, num_splits, stride_pb, stride_ph, stride_ps,
                          stride_ob, stride_oh, num_heads, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                          SPLITS_P2: tl.constexpr, HAS_SINKS: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < num_splits
    lse = tl.load(part_lse + (b * num_heads + h) * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(s_ok, tl.exp(lse - m_safe), 0.0)
    total = tl.sum(w, axis=0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    d = tl.arange(0, D_P2)
    d_ok = d < HEAD_DIM
    parts = tl.load(part_out + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots stay IEEE fp32 (no TF32), so fp32 runs match the references."""
    return "ieee" if dtype == torch.float32 else "tf32"


def default_num_splits(batch: int, max_context: int, num_kv_heads: int) -> int:
    """Enough programs to fill a GPU (~132 SMs x 4) without splits shorter than 256 tokens."""
    want = max(1, 512 // max(1, batch * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_context, 256), 64))


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, num_splits: int | None = None,
                           max_context: int | None = None, k_scale: Scale = 1.0,
                           v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, heads, head_dim]; block_tables [B, max_blocks]; seq_lens [B] (context incl. the
    query token) -> [B, heads, head_dim]. A sequence of length 0 attends to nothing: zeros.
    sinks: [heads] attention-sink logits (gpt-oss), or None.
    k_scale/v_scale: an FP8 cache's scales (ignored for a cache in the query's dtype).
    ``max_context`` (default: the block table's width in tokens) sets the number of splits
    without a device-to-host read of ``seq_lens``; each sequence divides its own context among them."""
    b, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(query)
    if b == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = max_context or block_tables.shape[1] * block_size
    num_splits = num_splits or default_num_splits(b, max_context, num_kv_heads)
    # NOTE: 32 tokens per tile: at head_dim 128 in bf16 this compiles to 156 registers (3 programs
    # per SM) without spills; 64 spills at 4 warps (ptxas for sm_90, checked on the CPU)
    tile = 32
    d_p2 = _pow2(head_dim, 16)
    # NOTE: a wide head (MLA's 576 -> 1024 lanes) with many heads per KV head (128 in DeepSeek-V3)
    # would need 256 KiB+ of shared memory for the query tile alone: its heads split over programs
    rows = min(_pow2(group, 16), 16 if d_p2 > 256 else 128)
    head_blocks = triton.cdiv(group, rows)
    part_out = torch.empty(b, num_heads, num_splits, d_p2, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(b, num_heads, num_splits, dtype=torch.float32, device=query.device)
    q = query.contiguous()
    fp8 = is_fp8(k_cache.dtype)
    _decode_split_kernel[(b, num_kv_heads * head_blocks, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, scale,
        scale_tensor(k_scale, q.device), scale_tensor(v_scale, q.device),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), num_heads, num_splits,
        sliding_window or 0, GROUP=group, ROWS=rows, HEAD_DIM=head_dim, D_P2=d_p2,
        BLOCK_SIZE=block_size, TILE=tile, PRECISION=_precision(query.dtype), FP8=fp8, HEAD_BLOCKS=head_blocks)
    _decode_reduce_kernel[(b, num_heads)](
        part_out, part_lse, out, sinks if sinks is not None else part_lse, num_splits, part_out.stride(0),
        part_out.stride(1), part_out.stride(2), out.stride(0), out.stride(1), num_heads, HEAD_DIM=head_dim, D_P2=d_p2,
        SPLITS_P2=_pow2(num_splits), HAS_SINKS=sinks is not None)
    return out


@triton.jit(do_not_specialize=["stride_bt", "window"])
def _prefill_kernel(Q, K, V, Out, block_tables, query_start, context_lens, scale, k_scale, v_scale, Sinks,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
                    window, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, FP8: tl.constexpr, HAS_SINKS: tl.constexpr):
    seq, h, m_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start + seq).to(tl.int32)  # int32 whatever the index dtype: see `lo`
    q_len = tl.load(query_start + seq + 1).to(tl.int32) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens + seq).to(tl.int32)
    prefix = ctx - q_len  # cached tokens before this chunk
    kvh = h // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = prefix + rows
    d = tl.arange(0, D_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink as the first score seen: exp(sink - max) = 1, no value
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(Sinks + h).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
    hi = tl.minimum(prefix + (m_block + 1) * BLOCK_M, ctx)  # causal: nothing after the last row
    lo = 0
    if window > 0:
        lo = tl.maximum(0, prefix + m_block * BLOCK_M - window + 1)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        block = tl.load(block_tables + seq * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        offs = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = _load_kv(K, offs[:, None] + d[None, :], kv_mask, k_scale, q.dtype, FP8)
        v = _load_kv(V, offs[:, None] + d[None, :], kv_mask, v_scale, q.dtype, FP8)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [BLOCK_M, BLOCK_N]
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if window > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention_varlen(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                   context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                                   max_query_len: int | None = None, k_scale: Scale = 1.0,
                                   v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Chunks of several sequences in one flat batch, each attending causally to its cached prefix
    and to itself. query [T, heads, head_dim]; block_tables [S, max_blocks]; query_start_loc [S + 1]
    (cumulative query lengths); context_lens [S] (cached prefix + chunk) -> [T, heads, head_dim].
    The KV of the chunks must already be in the cache."""
    t, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(query)
    num_seqs = context_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_m = 16 if max_query_len <= 16 else 32 if max_query_len <= 32 else 64
    # NOTE: at head_dim 128 in bf16 for sm_90, 8 warps and these key tiles compile to 162-192
    # registers without spills (4 warps and 16-key tiles: 250); K/V tiles may span cache blocks
    block_n = 64 if block_m == 64 and head_dim <= 128 else 32
    if head_dim > 256:  # MLA's 576 (1024 lanes): 16 x 32 tiles keep shared memory within sm_90's 227 KiB
        block_m, block_n = 16, 32
    q = query.contiguous()
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, scale,
        scale_tensor(k_scale, q.device), scale_tensor(v_scale, q.device), sinks if sinks is not None else out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), sliding_window or 0, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        D_P2=_pow2(head_dim, 16), BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=_precision(query.dtype), FP8=is_fp8(k_cache.dtype), HAS_SINKS=sinks is not None, num_warps=8)
    return out
