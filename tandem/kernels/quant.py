"""Weight quantization formats: quantize/dequantize references and the quantized linear products.

Every quantized linear computes ``x @ dequantize(weight).T`` (+ bias) with fp32 accumulation; the
references here define the numbers, and the Triton kernels (``tandem/kernels/quant_triton.py``)
take the same arguments. Layouts, all for a weight ``[N out, K in]``:

* int8, per channel: ``q`` int8 ``[N, K]``, ``scale`` fp32 ``[N]`` (symmetric, absmax / 127).
* fp8 e4m3: ``q`` float8_e4m3fn ``[N, K]`` with ``scale`` fp32 ``[N]`` (per channel) or
  ``[ceil(N/128), ceil(K/128)]`` (128x128 blocks, DeepSeek-V3's ``weight_block_size``).
* mxfp4 (OCP MX): E2M1 codes packed two per byte along K (element 2i in the low nibble),
  ``packed`` uint8 ``[N, K/2]``; one E8M0 scale per 32 elements, ``scales`` uint8 ``[N, K/32]``
  (the value is 2 ** (s - 127)).
* nvfp4: the same codes and packing, one float8_e4m3fn scale per 16 elements ``[N, K/16]``, and
  a per-tensor fp32 ``global_scale``: value = code * scale * global_scale.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_BLOCK = 128
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> magnitude; bit 3 is the sign
E2M1_MAX = 6.0
MX_BLOCK, NV_BLOCK = 32, 16
_TINY = 1e-12  # an all-zero row or block gets this scale, so nothing divides by zero


# -- int8 ---------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] fp32), w ~= q * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_TINY)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: x [M, K] (any float type) @ (q * scale).T in fp32, returned in x's dtype."""
    return _finish(x.float() @ dequantize_int8(q, scale).t(), bias, x.dtype)


# -- fp8 ----------------------------------------------------------------------------------------

def quantize_fp8(weight: torch.Tensor, block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with a scale per output channel, or per 128x128 block when ``block``."""
    w = weight.float()
    if not block:
        scale = (w.abs().amax(dim=1) / FP8_E4M3_MAX).clamp_min(_TINY)
        return (w / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale
    n, k = w.shape
    blocks = _pad_to_blocks(w).abs()  # [N/128, 128, K/128, 128]
    scale = (blocks.amax(dim=(1, 3)) / FP8_E4M3_MAX).clamp_min(_TINY)
    q = (w / _expand_block_scale(scale, n, k)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    if scale.dim() == 1:
        return q.float() * scale[:, None]
    return q.float() * _expand_block_scale(scale, n, k)


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: the fp8 weight dequantized, activations as they are."""
    return _finish(x.float() @ dequantize_fp8(q, scale).t(), bias, x.dtype)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (xq [M, K] e4m3, scale [M] fp32)."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=1) / FP8_E4M3_MAX).clamp_min(_TINY)
    return (x32 / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_w8a8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 (per-channel weight scales only): activations quantized per token to e4m3, the
    product of the two fp8 operands accumulated in fp32, then both scales applied."""
    if scale.dim() != 1:
        raise ValueError("W8A8 takes per-channel weight scales; 128x128 block scales run W8A16 (fp8_linear_ref)")
    xq, x_scale = quantize_fp8_per_token(x)
    acc = xq.float() @ q.float().t()
    return _finish(acc * x_scale[:, None] * scale[None, :], bias, x.dtype)


def _pad_to_blocks(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    pn, pk = -n % FP8_BLOCK, -k % FP8_BLOCK
    padded = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return padded.view((n + pn) // FP8_BLOCK, FP8_BLOCK, (k + pk) // FP8_BLOCK, FP8_BLOCK)


def _expand_block_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    full = scale.repeat_interleave(FP8_BLOCK, dim=0).repeat_interleave(FP8_BLOCK, dim=1)
    return full[:n, :k]


# -- fp4 (mxfp4, nvfp4) ------------------------------------------------------------------------

def _e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 already divided by its scale -> 4-bit codes (uint8), round to nearest, saturating."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=v.device)
    mag = torch.bucketize(v.abs(), mids).to(torch.uint8)  # 0..7
    return mag | ((v < 0).to(torch.uint8) << 3)


def _e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] bytes, element 2i in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _check_fp4_shape(weight: torch.Tensor, block: int, name: str) -> None:
    if weight.dim() != 2 or weight.shape[1] % block:
        raise ValueError(f"{name} needs the input dimension to be a multiple of {block}, "
                         f"got a weight of shape {tuple(weight.shape)}")


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [N, K/2], E8M0 scales uint8 [N, K/32]). The block's shared exponent is
    floor(log2(absmax)) - 2 (E2M1's largest exponent), as the OCP MX spec computes it."""
    _check_fp4_shape(weight, MX_BLOCK, "mxfp4")
    n, k = weight.shape
    blocks = weight.float().view(n, k // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp_(-127, 127)
    codes = _e2m1_encode(blocks / torch.exp2(exponent)[..., None]).view(n, k)
    return pack_fp4(codes), (exponent + 127).to(torch.uint8)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    values = _e2m1_decode(unpack_fp4(packed)).view(n, -1, MX_BLOCK)
    return (values * torch.exp2(scales.float() - 127)[..., None]).view(n, -1)


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [N, K/2], e4m3 scales [N, K/16], global fp32 scale []), the global scale
    mapping the tensor's absmax onto the largest (e4m3 scale x E2M1) product."""
    _check_fp4_shape(weight, NV_BLOCK, "nvfp4")
    n, k = weight.shape
    blocks = weight.float().view(n, k // NV_BLOCK, NV_BLOCK)
    global_scale = (blocks.abs().amax() / (FP8_E4M3_MAX * E2M1_MAX)).clamp_min(_TINY)
    block_scale = (blocks.abs().amax(dim=-1) / E2M1_MAX / global_scale).clamp_(max=FP8_E4M3_MAX)
    scales = block_scale.to(torch.float8_e4m3fn)
    divisor = (scales.float() * global_scale).clamp_min(_TINY)
    codes = _e2m1_encode(blocks / divisor[..., None]).view(n, k)
    return pack_fp4(codes), scales, global_scale


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    values = _e2m1_decode(unpack_fp4(packed)).view(n, -1, NV_BLOCK)
    return (values * (scales.float() * global_scale.float())[..., None]).view(n, -1)


def mxfp4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return _finish(x.float() @ dequantize_mxfp4(packed, scales).t(), bias, x.dtype)


def nvfp4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return _finish(x.float() @ dequantize_nvfp4(packed, scales, global_scale).t(), bias, x.dtype)


def _finish(acc: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)
