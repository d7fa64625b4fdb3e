"""Rotary embedding (neox style: rotate halves) fused with the KV-cache write: rotates q and k of
this step's tokens by their positions and stores the rotated k and the v at their flat cache
slots (``block_id * block_size + offset``). Torch reference and Triton kernel, same signature.
cos/sin: ``[max_positions, head_dim // 2]`` fp32 (attention scaling already folded in)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.kv_quant import fp8_grid, fp8_max, is_fp8
from tandem.kernels.paged_attention import Scale, write_kv_cache
from tandem.kernels.triton_attention import scale_tensor


def rope_and_write_kv_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: Scale = 1.0,
                          v_scale: Scale = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D], k/v [T, kv_heads, D] -> (rotated q, rotated k); the cache gets k and v
    (an FP8 cache quantized with k_scale / v_scale)."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q_rot, k_rot = rotate_neox(q, c, s), rotate_neox(k, c, s)
    write_kv_cache(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot, k_rot


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] by cos/sin [..., D // 2] broadcast over the head axis, halves rotated."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@triton.jit
def _round_to_fp8_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """fp32 y (within the format's range) rounded to nearest even on the grid of an FP8 format with
    MANT mantissa bits and smallest normal exponent EMIN, so that the cast after it is exact.
    NOTE: Triton's interpreter rounds casts to FP8 half-up and loses the carry into the exponent
    (7.93 -> 4.0 in e4m3); rounding here keeps it, and the GPU, bit-equal to torch's conversion."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = ((tl.maximum(e, EMIN) - MANT + 127) << 23).to(tl.float32, bitcast=True)
    c = quantum * 12582912.0  # 1.5 * 2**23: y + c has ulp `quantum`, so the add rounds y to it
    r = (y + c) - c
    return tl.where(r == 0.0, y * 0.0, r)  # a zero keeps y's sign, as torch's cast does


@triton.jit
def _to_cache(x, scale_ptr, C, FP8: tl.constexpr, FP8_MAX: tl.constexpr, MANT: tl.constexpr,
              EMIN: tl.constexpr):
    """x as the cache at C stores it: itself, or clamp(x / scale) in FP8 (kv_quant.quantize)."""
    if FP8:  # NOTE: one return: the compiler types every return of a function alike
        # div_rn: IEEE division as torch's (a plain / is an approximate division on the GPU)
        y = tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr))
        x = _round_to_fp8_grid(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), MANT, EMIN)
    return x.to(C.dtype.element_ty)


@triton.jit
def _rope_kv_kernel(positions, Q, K, V, QO, KO, COS, SIN, KC, VC, slots, k_scale, v_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_kot, stride_cos,
                    stride_cache_slot, stride_cache_h, num_heads, num_kv_heads,
                    HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr, FP8: tl.constexpr,
                    FP8_MAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(positions + t)
    i = tl.arange(0, HALF_P2)
    i_ok = i < HALF
    cos = tl.load(COS + pos * stride_cos + i, mask=i_ok, other=0.0)
    sin = tl.load(SIN + pos * stride_cos + i, mask=i_ok, other=0.0)
    h = tl.arange(0, HEADS_P2)
    # q: every head of this token
    q_mask = (h < num_heads)[:, None] & i_ok[None, :]
    q_offs = t * stride_qt + h[:, None] * stride_qh + i[None, :]
    q1 = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    q2 = tl.load(Q + q_offs + HALF, mask=q_mask, other=0.0)
    c, s = cos.to(q1.dtype)[None, :], sin.to(q1.dtype)[None, :]
    qo_offs = t * stride_qot + h[:, None] * (2 * HALF) + i[None, :]  # outputs are contiguous
    tl.store(QO + qo_offs, q1 * c - q2 * s, mask=q_mask)
    tl.store(QO + qo_offs + HALF, q2 * c + q1 * s, mask=q_mask)
    # k (rotated) and v, to the output and to the cache slot
    kv_mask = (h < num_kv_heads)[:, None] & i_ok[None, :]
    k_offs = t * stride_kt + h[:, None] * stride_kh + i[None, :]
    k1 = tl.load(K + k_offs, mask=kv_mask, other=0.0)
    k2 = tl.load(K + k_offs + HALF, mask=kv_mask, other=0.0)
    r1, r2 = k1 * c - k2 * s, k2 * c + k1 * s
    ko_offs = t * stride_kot + h[:, None] * (2 * HALF) + i[None, :]
    tl.store(KO + ko_offs, r1, mask=kv_mask)
    tl.store(KO + ko_offs + HALF, r2, mask=kv_mask)
    slot = tl.load(slots + t).to(tl.int64)
    c_offs = slot * stride_cache_slot + h[:, None] * stride_cache_h + i[None, :]
    tl.store(KC + c_offs, _to_cache(r1, k_scale, KC, FP8, FP8_MAX, MANT, EMIN), mask=kv_mask)
    tl.store(KC + c_offs + HALF, _to_cache(r2, k_scale, KC, FP8, FP8_MAX, MANT, EMIN), mask=kv_mask)
    v_offs = t * stride_vt + h[:, None] * stride_vh + i[None, :]
    v1 = tl.load(V + v_offs, mask=kv_mask, other=0.0)
    v2 = tl.load(V + v_offs + HALF, mask=kv_mask, other=0.0)
    tl.store(VC + c_offs, _to_cache(v1, v_scale, VC, FP8, FP8_MAX, MANT, EMIN), mask=kv_mask)
    tl.store(VC + c_offs + HALF, _to_cache(v2, v_scale, VC, FP8, FP8_MAX, MANT, EMIN), mask=kv_mask)


def rope_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: Scale = 1.0,
                      v_scale: Scale = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's strides
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    half = head_dim // 2
    kc = k_cache.view(-1, num_kv_heads, head_dim)
    vc = v_cache.view(-1, num_kv_heads, head_dim)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and kc.stride(1) == vc.stride(1) == head_dim
    assert cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
    fp8 = is_fp8(k_cache.dtype)
    mant, emin = fp8_grid(k_cache.dtype) if fp8 else (0, 0)
    _rope_kv_kernel[(t,)](positions, q, k, v, q_out, k_out, cos, sin, kc, vc, slot_mapping,
                          scale_tensor(k_scale, q.device), scale_tensor(v_scale, q.device),
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          q_out.stride(0), k_out.stride(0), cos.stride(0), kc.stride(0), kc.stride(1), num_heads, num_kv_heads,
                          HALF=half, HALF_P2=triton.next_power_of_2(half),
                          HEADS_P2=triton.next_power_of_2(max(num_heads, num_kv_heads)), FP8=fp8,
                          FP8_MAX=fp8_max(k_cache.dtype) if fp8 else 0.0, MANT=mant, EMIN=emin)
    return q_out, k_out
