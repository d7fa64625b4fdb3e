"""The quantized-linear Triton kernels (quant_triton.py) against their torch references (quant.py),
on CPU through TRITON_INTERPRET=1: odd M and N, K not a multiple of the kernel's K tile (and for
block-scaled fp8 not a multiple of 128), fp32 / bf16 / fp16 activations, with and without bias."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import quant as ref
from tandem.kernels import quant_triton as tri

# (M, N, K): K a multiple of 32 for the fp4 formats
SHAPES = [(1, 5, 64), (3, 33, 96), (17, 130, 160)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + m * 100 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _check(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **_tol(expected.dtype))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_linear_matches_reference(m, n, k, dtype, bias):
    x, w, b = _inputs(m, n, k + 3, dtype, bias)  # odd K: int8 masks the K tail
    q, scale = ref.quantize_int8(w)
    _check(tri.int8_linear(x, q, scale, b), ref.int8_linear_ref(x, q, scale, b))


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES[:2] + [(17, 130, 200)])  # 130 x 200: partial 128x128 blocks
def test_fp8_linear_matches_reference(m, n, k, dtype, bias, block):
    x, w, b = _inputs(m, n, k, dtype, bias)
    q, scale = ref.quantize_fp8(w, block=block)
    _check(tri.fp8_linear(x, q, scale, b), ref.fp8_linear_ref(x, q, scale, b))


def test_fp8_linear_block_scales_across_several_blocks():
    """Scales that differ by orders of magnitude between the blocks of a 257 x 300 weight: a scale
    applied to the wrong K tile or row block shows at once."""
    x, w, b = _inputs(5, 257, 300, torch.float32, True)
    w = w * torch.logspace(-3, 3, 3).repeat_interleave(128)[:257, None] * torch.logspace(2, -2, 3).repeat_interleave(128)[:300]
    q, scale = ref.quantize_fp8(w, block=True)
    assert scale.shape == (3, 3)
    _check(tri.fp8_linear(x, q, scale, b), ref.fp8_linear_ref(x, q, scale, b))


def test_per_token_fp8_quantization_is_bit_exact():
    """The same e4m3 bits and scales as the reference: row 0 all zero, row 1 spanning e4m3's
    subnormals, row 2 values just under a power of two after scaling (a rounding carry)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 77, generator=g)
    x[0] = 0
    x[1] = x[1] * torch.logspace(-6, 0, 77)
    x[2, :] = 127.9
    x[2, 0] = 448.0 * 127.9 / 128  # scale = 127.9/128: the others land on 128 - epsilon
    for dtype in (torch.float32, torch.bfloat16):
        xq, xs = tri.quantize_fp8_per_token(x.to(dtype))
        rq, rs = ref.quantize_fp8_per_token(x.to(dtype))
        assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(xs, rs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp8_w8a8_linear_matches_reference(m, n, k, dtype, bias):
    x, w, b = _inputs(m, n, k + 5, dtype, bias)
    q, scale = ref.quantize_fp8(w)
    _check(tri.fp8_w8a8_linear(x, q, scale, b), ref.fp8_w8a8_linear_ref(x, q, scale, b))


def test_fp8_w8a8_refuses_block_scales():
    q, scale = ref.quantize_fp8(torch.randn(130, 200), block=True)
    with pytest.raises(ValueError, match="per-channel"):
        tri.fp8_w8a8_linear(torch.randn(2, 200), q, scale)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_mxfp4_linear_matches_reference(m, n, k, dtype, bias):
    x, w, b = _inputs(m, n, k, dtype, bias)
    packed, scales = ref.quantize_mxfp4(w)
    _check(tri.mxfp4_linear(x, packed, scales, b), ref.mxfp4_linear_ref(x, packed, scales, b))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES + [(2, 7, 48)])  # 48: a multiple of 16, not of 32
def test_nvfp4_linear_matches_reference(m, n, k, dtype, bias):
    x, w, b = _inputs(m, n, k, dtype, bias)
    packed, scales, global_scale = ref.quantize_nvfp4(w)
    _check(tri.nvfp4_linear(x, packed, scales, global_scale, b), ref.nvfp4_linear_ref(x, packed, scales, global_scale, b))


def test_fp4_kernels_decode_every_code_and_scale():
    """x = I reads the dequantized weight back: every byte (both nibbles, all 16 codes each) under
    E8M0 scales from 2 ** -127 (byte 0, an fp32 subnormal) to 2 ** 73, and e4m3 scales including
    subnormal ones, exactly as the references decode them."""
    packed = torch.arange(256, dtype=torch.uint8).view(8, 32)  # [N 8, K 64]
    eye = torch.eye(64)
    mx_scales = torch.tensor([0, 1, 100, 127, 128, 140, 200, 120], dtype=torch.uint8).view(8, 1).repeat(1, 2)
    mx_scales[:, 1] += 1
    expected = ref.dequantize_mxfp4(packed, mx_scales)
    assert torch.equal(tri.mxfp4_linear(eye, packed, mx_scales), expected.t())
    nv_scales = torch.tensor([2.0 ** -9, 0.5, 1.0, 3.0, 448.0, 2.0 ** -7, 13.0, 0.0]).repeat_interleave(4).view(8, 4)
    nv_scales = nv_scales.to(torch.float8_e4m3fn)
    g = torch.tensor(0.75)
    torch.testing.assert_close(tri.nvfp4_linear(eye, packed, nv_scales, g), ref.dequantize_nvfp4(packed, nv_scales, g).t(),
                               rtol=1e-6, atol=0)


def test_leading_dims_and_empty_batch():
    x, w, b = _inputs(6, 33, 64, torch.float32, True)
    q, scale = ref.quantize_int8(w)
    got = tri.int8_linear(x.view(2, 3, 64), q, scale, b)
    assert got.shape == (2, 3, 33)
    _check(got.view(6, 33), ref.int8_linear_ref(x, q, scale, b))
    packed, scales = ref.quantize_mxfp4(w)
    assert tri.mxfp4_linear(torch.empty(0, 64), packed, scales).shape == (0, 33)
    assert tri.fp8_w8a8_linear(torch.empty(0, 64), *ref.quantize_fp8(w)).shape == (0, 33)


def test_fp4_shape_errors():
    packed, scales = ref.quantize_mxfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="input features"):
        tri.mxfp4_linear(torch.randn(2, 32), packed, scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        tri.mxfp4_linear(torch.randn(2, 64), packed, scales[:, :1])
