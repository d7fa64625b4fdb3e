"""Weight formats (tandem/kernels/quant.py) and the schemes built on them: round trips within each
format's precision, exact codes for representable values, packing, odd shapes, and every
QuantizedWeight equal to dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import quant as Q
from tandem.quantization.schemes import SCHEMES, Int8Weight, check_scheme, quantize_weight


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = _weight(37, 70)
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert q.abs().max() <= 127
    assert ((Q.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("block", [False, True])
def test_fp8_round_trip_and_scale_layout(block):
    w = _weight(130, 200)  # neither a multiple of 128: partial edge blocks
    q, scale = Q.quantize_fp8(w, block=block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == ((2, 2) if block else (130,))
    assert _rel(Q.dequantize_fp8(q, scale), w) < 0.04  # e4m3 carries 3 mantissa bits


def test_fp8_block_scale_covers_only_its_block():
    w = _weight(256, 256)
    w[:128, :128] *= 1000  # one loud block must not flatten the others
    q, scale = Q.quantize_fp8(w, block=True)
    assert scale[0, 0] > 100 * scale[1, 1]
    assert _rel(Q.dequantize_fp8(q, scale)[128:, 128:], w[128:, 128:]) < 0.04


def test_e2m1_codes_are_exact_for_representable_values_and_packed_low_nibble_first():
    values = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, 7.5, -100.0]])
    codes = Q._e2m1_encode(values)
    assert codes.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 7, 15]]  # saturates at +-6
    packed = Q.pack_fp4(codes)
    assert packed[0, 0].item() == 0 | (1 << 4)
    assert torch.equal(Q.unpack_fp4(packed), codes)
    assert Q._e2m1_decode(codes)[0, :8].tolist() == list(Q.E2M1_VALUES)


def test_mxfp4_scales_are_powers_of_two_from_the_block_max():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-3.0, 3.0, 32)  # absmax 3: exponent floor(log2 3) - 2 = -1
    w[1, 32:] = 6.0 * 8  # exactly representable: 6 * 2**3
    packed, scales = Q.quantize_mxfp4(w)
    assert packed.shape == (2, 32) and scales.shape == (2, 2)
    assert scales[0, 0].item() == 127 - 1 and scales[1, 1].item() == 127 + 3  # floor(log2 48) - 2
    assert torch.equal(Q.dequantize_mxfp4(packed, scales)[1], w[1])


def test_nvfp4_round_trip_and_shape_checks():
    w = _weight(33, 96)
    packed, scales, global_scale = Q.quantize_nvfp4(w)
    assert packed.shape == (33, 48) and scales.shape == (33, 6) and scales.dtype == torch.float8_e4m3fn
    assert global_scale.dim() == 0
    assert _rel(Q.dequantize_nvfp4(packed, scales, global_scale), w) < 0.15  # 4-bit: a coarse grid
    with pytest.raises(ValueError, match="multiple of 16"):
        Q.quantize_nvfp4(_weight(4, 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_mxfp4(_weight(4, 48))


def test_all_zero_rows_quantize_without_nan():
    w = torch.zeros(3, 64)
    for scheme in ("int8", "fp8", "fp8_block", "mxfp4", "nvfp4"):
        assert torch.equal(quantize_weight(w, scheme).dequantize(), w), scheme


def test_w8a8_reference_quantizes_activations_per_token():
    w, x = _weight(40, 64), torch.randn(5, 64)
    x[0] *= 1000  # a loud token must not cost the others their precision
    q, scale = Q.quantize_fp8(w)
    out = Q.fp8_w8a8_linear_ref(x, q, scale)
    exact = x @ Q.dequantize_fp8(q, scale).t()
    assert _rel(out[1:], exact[1:]) < 0.05 and _rel(out[:1], exact[:1]) < 0.05


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_dequantize_then_matmul(scheme, rows, dtype):
    w, bias = _weight(48, 96, seed=1), torch.randn(48) * 0.1
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(dtype)
    qw = quantize_weight(w, scheme)
    expected = (x.float() @ qw.dequantize().float().t() + bias).to(dtype)
    out = qw(x, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (rows, 48)
    # activations in bf16 (the dtype, int8's fast path, or a bf16/fp16 layer) round to 8 bits of mantissa
    tol = 1e-5 if dtype == torch.float32 and scheme not in ("int8", "bf16", "fp16") else 2e-2
    assert _rel(out.float(), expected.float()) < tol
    assert qw.nbytes < w.numel() * 4 or scheme == "fp32"


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("in_features", [208, 200, 100])
def test_int8_cpu_paths_agree_with_the_reference(rows, in_features):
    """tandem's C++ kernel (fp32 activations) to fp32 rounding; torch's int8pack (bf16) to bf16's, and
    never taken where K % 16 != 0 (torch's op is wrong or crashes there on AVX2 and AVX-512)."""
    qw = Int8Weight.from_float(_weight(37, in_features))  # a partial block of 8 channels, a K tail
    assert qw.int8pack_ok == (in_features % 16 == 0)
    x, bias = torch.randn(rows, in_features), torch.randn(37)
    ref = Q.int8_linear_ref(x, qw.q, qw.scale, bias)
    assert _rel(qw.run_cpu("tandem", x, bias), ref) < 1e-6
    assert _rel(qw.run_cpu("dequant", x, bias), ref) < 1e-6
    assert _rel(qw.run_cpu("int8pack", x, bias), ref) < 1e-2
    bf = x.bfloat16()
    assert qw.run_cpu("tandem", bf, None).dtype == torch.bfloat16
    routes: dict = {}
    qw.measure_cpu_routes(routes, torch.float32)
    assert qw.int8pack_ok or "int8pack" not in qw.cpu_routes


def test_int8_cpu_routes_are_measured_once_per_shape():
    qw = Int8Weight.from_float(_weight(64, 128))
    routes: dict = {}
    qw.measure_cpu_routes(routes, torch.float32)
    assert list(routes) == [(64, 128, torch.float32)] and len(qw.cpu_routes) == 4
    assert set(qw.cpu_routes) <= {"tandem", "int8pack", "dequant"}
    other = Int8Weight.from_float(_weight(64, 128, seed=2))
    other.measure_cpu_routes(routes, torch.float32)
    assert len(routes) == 1 and other.cpu_routes == qw.cpu_routes


def test_check_scheme_names_the_problem():
    assert check_scheme("int8", 30) is None
    assert "unknown scheme 'int3'" in (check_scheme("int3", 64) or "")
    assert "multiple of 32" in (check_scheme("mxfp4", 48) or "")
