"""FP8 KV cache: the cache dtypes, and quantize-on-write / dequantize-on-read (torch references).

A layer whose cache is FP8 holds ``fp8 = clamp(x / scale, -max, max)`` (computed in fp32, rounded
to nearest) and reads back ``fp8.float() * scale``, with one fp32 scale per layer for K and one for
V (``k_scale``/``v_scale``: 1-element fp32 tensors on the cache's device, so CUDA graphs and
kernels read their current value). A cache in a float dtype ignores the scales.
"""

from __future__ import annotations

import math

import torch

from tandem.config import KV_CACHE_DTYPES

_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """kv_cache_dtype -> the torch dtype of the (not skipped) layers' caches."""
    if name == "auto":
        return model_dtype
    if name not in _FP8:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return _FP8[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value: 448 (e4m3fn), 57344 (e5m2)."""
    return float(torch.finfo(dtype).max)


def fp8_grid(dtype: torch.dtype) -> tuple[int, int]:
    """(mantissa bits, smallest normal exponent): e4m3fn (3, -6), e5m2 (2, -14)."""
    info = torch.finfo(dtype)
    return round(-math.log2(info.eps)), round(math.log2(info.smallest_normal))


def quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) -> dtype (FP8): x / scale in fp32, saturated to the format's range."""
    m = fp8_max(dtype)
    return (x.float() / scale).clamp_(-m, m).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """FP8 x -> dtype: x.float() * scale, rounded once to dtype."""
    return (x.float() * scale).to(dtype)


def store(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache.view(-1, *row shape)[slots] = rows (already in the cache's dtype). FP8 goes through a
    byte view: CPU index_copy_ has no FP8 kernel."""
    flat = cache.view(-1, *rows.shape[1:])
    if is_fp8(cache.dtype):
        flat.view(torch.uint8).index_copy_(0, slots, rows.view(torch.uint8))
    else:
        flat.index_copy_(0, slots, rows)


def calibrated_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor scale that maps x's largest magnitude onto the format's largest value
    (1.0 for an all-zero x), fp32 [1]."""
    amax = x.detach().abs().max().float()
    return torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax)).reshape(1)
