"""Triton kernels for the quantized linear products of ``quant.py``: same signatures, same numbers.

Each function computes ``x @ dequantize(weight).T`` (+ bias) for ``x [..., K]`` in fp32, bf16 or
fp16, returning ``[..., N]`` in x's dtype. Layouts and scales are those of ``quant.py``.

* ``int8_linear``, ``fp8_linear`` (W8A16): a weight tile is loaded in its 8-bit type and widened to
  x's dtype (exact: int8 and e4m3 values fit bf16 and fp16), multiplied with ``tl.dot`` into an fp32
  accumulator, and the per-channel scale is applied once per output column at the end. With
  128x128 block scales the K tile divides 128, so each tile has one scale per output row and that
  scale multiplies the tile's partial product inside the K loop.
* ``fp8_w8a8_linear``: x is quantized per token to e4m3 (absmax / 448, a small kernel), then an
  fp8 x fp8 ``tl.dot`` accumulates in fp32 and ``x_scale[:, None] * w_scale[None, :]`` is applied.
  Per-channel weight scales only, as in the reference.
* ``mxfp4_linear``, ``nvfp4_linear``: **emulated**. The E2M1 nibbles and their block scales are
  dequantized in the kernel to x's dtype (exact: a code times a power of two, or times an e4m3
  scale, has at most 6 significant bits; for fp16, as long as the weight lies in fp16's range) and
  multiplied with an ordinary bf16/fp16/fp32 dot; the nvfp4 per-tensor scale multiplies the
  accumulator. Native FP4 tensor-core math exists only on Blackwell (sm_100+); these kernels do
  not use it: everywhere, Blackwell included, and in the interpreter, the emulation is what runs.

fp32 activations use IEEE fp32 dots (no TF32), so fp32 runs match the references. Runs on NVIDIA
GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (how CI checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.quant import FP8_BLOCK, FP8_E4M3_MAX, MX_BLOCK, NV_BLOCK

_TINY = 1e-12  # as quant.py: an all-zero token gets this scale
_BLOCK_N = 64  # K tiles (_tiles) are 16 or 64: they divide FP8_BLOCK, as block-scaled fp8 needs


@triton.jit
def _scaled_mm_kernel(X, W, WS, XS, B, Y, M, N, K, stride_xm, stride_wn, stride_wsn, stride_ym,
                      BLOCK_SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                      FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y [M, N] = (X [M, K] @ W[N, K].T) * scales (+ B). X's and W's rows are contiguous.

    W (int8 or e4m3) is widened to X's element type before the dot (a no-op when X is e4m3 too), or
    with FP32_DOT both operands to fp32 (see ``_FP32_DOT``).
    WS: per output channel [N] fp32, or with BLOCK_SCALED one scale per SCALE_BLOCK x SCALE_BLOCK
    block, [cdiv(N, SCALE_BLOCK), cdiv(K, SCALE_BLOCK)] with row stride stride_wsn; then
    SCALE_BLOCK % BLOCK_K == 0, so the tile [k0, k0 + BLOCK_K) lies in scale column k0 // SCALE_BLOCK.
    XS: None, or a per-row [M] fp32 scale of X (W8A8). B: None or [N].
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        # masked K positions load 0 in both operands, so they add nothing
        x = tl.load(X + rm[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, w.to(x.dtype), input_precision=PRECISION, out_dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        if BLOCK_SCALED:
            s = tl.load(WS + (rn // SCALE_BLOCK) * stride_wsn + k0 // SCALE_BLOCK, mask=n_ok, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
        else:
            acc += part
    if XS is not None:
        acc = acc * tl.load(XS + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if not BLOCK_SCALED:
        acc = acc * tl.load(WS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if B is not None:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _per_token_fp8_kernel(X, XQ, XS, K, stride_xm, stride_qm, FP8_MAX: tl.constexpr, TINY: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """One program per row: XS[row] = max(absmax(X[row]) / FP8_MAX, TINY), XQ[row] = X[row] / XS[row]
    saturated to +-FP8_MAX and rounded to e4m3 (to nearest even, as torch's cast). The rounding is
    done in fp32 (``_round_to_e4m3``) so the cast itself is exact: the GPU's cvt.rn would round the
    same way, but the interpreter's fp8 cast rounds ties up and drops a mantissa carry into the
    exponent (124.3 -> 64 instead of 128). Divisions are IEEE (div_rn) like torch's: Triton's ``/``
    is div.full.f32 on NVIDIA GPUs, off by up to 2 ulp."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), FP8_MAX), TINY)
    tl.store(XS + row, scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        x = tl.load(X + row * stride_xm + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX), FP8_MAX))
        tl.store(XQ + row * stride_qm + k0 + cols, q.to(XQ.dtype.element_ty), mask=ok)


@triton.jit
def _round_to_e4m3(v):
    """fp32 v, |v| <= 448 -> the nearest e4m3 value (ties to even), as fp32. e4m3 keeps 3 mantissa
    bits, so the spacing at v is 2 ** (floor(log2 |v|) - 3), and 2 ** -9 below the smallest normal
    2 ** -6; v / spacing (times an exact power-of-two inverse) has |.| < 16, and adding then
    removing 1.5 * 2 ** 23 rounds it to an integer by fp32's own round-to-nearest-even. Rounded as
    |v| and signed after, so a negative value that rounds to zero gives -0, as the cast does."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |v|); -127 for 0
    spacing_exp = tl.maximum(exponent, -6) - 3  # in [-9, 5]
    spacing = ((spacing_exp + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - spacing_exp) << 23).to(tl.float32, bitcast=True)
    mag = ((tl.abs(v) * inverse + 12582912.0) - 12582912.0) * spacing
    return tl.where(v < 0, -mag, mag)


@triton.jit
def _e2m1_value(code):
    """4-bit E2M1 codes (int32) -> fp32: bit 3 the sign; bits 2-1 the exponent e, bit 0 the
    mantissa m; e == 0 is subnormal (m * 0.5), else 2 ** (e - 1) * (1 + m / 2). In halves the
    magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 are the integers m (e == 0) or (2 + m) << (e - 1)."""
    e = (code >> 1) & 3
    m = code & 1
    halves = tl.where(e == 0, m, ((2 + m) << e) >> 1)
    mag = halves.to(tl.float32) * 0.5
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _fp4_mm_kernel(X, P, S, G, B, Y, M, N, K, stride_xm, stride_pn, stride_sn, stride_ym,
                   NVFP4: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, FP32_DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y [M, N] = X [M, K] @ dequantize(P, S, G).T (+ B), dequantizing in the kernel (emulated FP4).

    P: uint8 [N, K / 2], element k of row n in byte k // 2, the low nibble for even k. S: one scale
    per GROUP elements of a row, [N, K / GROUP]: E8M0 uint8 (mxfp4, 2 ** (s - 127)) or e4m3
    (nvfp4, times the per-tensor fp32 G [], applied to the accumulator). K % GROUP == 0."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        wmask = k_ok[:, None] & n_ok[None, :]
        x = tl.load(X + rm[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # [BLOCK_K, BLOCK_N] tiles gathered per element: each byte (and scale) is read by the
        # elements sharing it, which hit the same cache line
        byte = tl.load(P + rn[None, :] * stride_pn + (ks // 2)[:, None], mask=wmask, other=0).to(tl.int32)
        code = (byte >> ((ks % 2) * 4)[:, None]) & 0xF
        s = tl.load(S + rn[None, :] * stride_sn + (ks // GROUP)[:, None], mask=wmask, other=0.0)
        if NVFP4:
            scale = s.to(tl.float32)
        else:  # E8M0: the biased exponent itself; byte 0 is 2 ** -127, an fp32 subnormal
            bits = s.to(tl.int32)
            scale = tl.where(bits == 0, 1 << 22, bits << 23).to(tl.float32, bitcast=True)
        w = _e2m1_value(code) * scale  # fp32 [BLOCK_K, BLOCK_N]
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:  # exact in x's dtype (see the module docstring)
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION, out_dtype=tl.float32)
    if NVFP4:
        acc = acc * tl.load(G).to(tl.float32)
    if B is not None:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# -- wrappers -----------------------------------------------------------------------------------

# The interpreter multiplies bf16 tiles as their raw 16-bit patterns (numpy has no bf16) and casts
# integers to bf16 the same way, so there a bf16 dot runs on fp32 copies of its operands: the same
# numbers up to summation order, as a bf16 x bf16 product is exact in fp32. GPUs dot bf16 directly.
_FP32_DOT = bool(triton.knobs.runtime.interpret)


def _fp32_dot(dtype: torch.dtype) -> bool:
    return _FP32_DOT and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots stay IEEE fp32 (no TF32), so fp32 runs match the references."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _tiles(dtype: torch.dtype, m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps). Rows per program: 16 (tl.dot's minimum) for decode-sized
    batches, up to 64. fp32 dots run on FMA units (IEEE, no tensor cores), where a 64-wide K tile
    spills; K 16 does not. 8 warps for 64 rows: 4 spill (ptxas for sm_90, checked on the CPU)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return block_m, 16 if dtype == torch.float32 else 64, 8 if block_m == 64 else 4


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [M, K] with contiguous rows."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_weight(x: torch.Tensor, k: int, name: str) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} input features, the weight {k}")


def _scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               x_scale: torch.Tensor | None, out_dtype: torch.dtype, lead: tuple) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m and n:
        q = q if q.stride(-1) == 1 else q.contiguous()
        scale = scale.contiguous()
        block_m, block_k, num_warps = _tiles(x.dtype, m)
        _scaled_mm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N))](
            x, q, scale, x_scale, bias, y, m, n, k, x.stride(0), q.stride(0), scale.stride(0), y.stride(0),
            BLOCK_SCALED=scale.dim() == 2, SCALE_BLOCK=FP8_BLOCK, PRECISION=_precision(x.dtype),
            FP32_DOT=_fp32_dot(x.dtype), BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=block_k, num_warps=num_warps)
    return y.view(*lead, n)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: x [..., K] @ (q [N, K] int8 * scale [N]).T (+ bias), in x's dtype."""
    _check_weight(x, q.shape[1], "int8_linear")
    if scale.dim() != 1:
        raise ValueError(f"int8_linear: the scale is per channel [N], got {tuple(scale.shape)}")
    return _scaled_mm(_rows(x), q, scale, _bias(bias), None, x.dtype, x.shape[:-1])


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: x [..., K] @ dequantize_fp8(q, scale).T (+ bias); scale [N] or 128x128 blocks."""
    _check_weight(x, q.shape[1], "fp8_linear")
    return _scaled_mm(_rows(x), q, scale, _bias(bias), None, x.dtype, x.shape[:-1])


def fp8_w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: x quantized per token to e4m3, an fp8 x fp8 product in fp32, both scales applied."""
    _check_weight(x, q.shape[1], "fp8_w8a8_linear")
    if scale.dim() != 1:
        raise ValueError("fp8_w8a8_linear takes per-channel weight scales [N] only, got "
                         f"{tuple(scale.shape)} (block-scaled fp8 runs W8A16: fp8_linear)")
    x2 = _rows(x)
    xq, x_scale = quantize_fp8_per_token(x2)
    return _scaled_mm(xq, q, scale, _bias(bias), x_scale, x.dtype, x.shape[:-1])


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] e4m3, scale [M] fp32), as quant.quantize_fp8_per_token."""
    x2 = _rows(x)
    m, k = x2.shape
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _per_token_fp8_kernel[(m,)](x2, xq, x_scale, k, x2.stride(0), xq.stride(0), FP8_MAX=FP8_E4M3_MAX,
                                    TINY=_TINY, BLOCK_K=min(1024, triton.next_power_of_2(max(k, 16))))
    return xq, x_scale


def _fp4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
            bias: torch.Tensor | None, group: int, name: str) -> torch.Tensor:
    n, k = packed.shape[0], 2 * packed.shape[1]
    _check_weight(x, k, name)
    if k % group or scales.shape != (n, k // group):
        raise ValueError(f"{name}: needs K a multiple of {group} and scales [N, K/{group}] = {(n, k // group)}, "
                         f"got packed {tuple(packed.shape)} and scales {tuple(scales.shape)}")
    x2 = _rows(x)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        packed, scales = packed.contiguous(), scales.contiguous()
        block_m, block_k, num_warps = _tiles(x.dtype, m)
        _fp4_mm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N))](
            x2, packed, scales, global_scale, _bias(bias), y, m, n, k, x2.stride(0), packed.stride(0),
            scales.stride(0), y.stride(0), NVFP4=global_scale is not None, GROUP=group,
            PRECISION=_precision(x.dtype), FP32_DOT=_fp32_dot(x.dtype), BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
            BLOCK_K=block_k, num_warps=num_warps)
    return y.view(*x.shape[:-1], n)


def mxfp4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_mxfp4(packed, scales).T (+ bias); emulated (see the module docstring)."""
    return _fp4_mm(x, packed, scales, None, bias, MX_BLOCK, "mxfp4_linear")


def nvfp4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_nvfp4(packed, scales, global_scale).T (+ bias); emulated."""
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(())
    return _fp4_mm(x, packed, scales, g, bias, NV_BLOCK, "nvfp4_linear")


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.contiguous()
