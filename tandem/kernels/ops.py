"""The non-attention ops a model layer calls, as one swappable set: torch references (CPU, and
the parity baseline) or Triton kernels (GPU; CPU under TRITON_INTERPRET=1). An attention backend
carries the set it pairs with (``backend.ops``). The sampling kernel is selected apart
(``tandem.runner.sampler.resolve_sampling_backend``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.kernels.activation import silu_and_mul_ref
from tandem.kernels.moe import fused_moe_torch
from tandem.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable  # (x, weight, eps) -> y
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (norm(residual + x), residual + x)
    silu_and_mul: Callable  # [T, 2N] -> [T, N]
    # (positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> (q, k) rotated,
    # cache written (an FP8 cache quantized with the layer's scales);
    # None: the model rotates in torch and the attention backend writes the cache
    rope_and_write_kv: Callable | None = None
    # (x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights, topk_ids, w13_bias, w2_bias, activation)
    # -> [T, H] (tandem/kernels/moe.py)
    fused_moe: Callable = fused_moe_torch


TORCH_OPS = Ops(rms_norm_ref, add_rms_norm_ref, silu_and_mul_ref)


def triton_ops() -> Ops:
    from tandem.kernels import activation, moe_triton, rms_norm, rope_kv

    return Ops(rms_norm.rms_norm, rms_norm.add_rms_norm, activation.silu_and_mul, rope_kv.rope_and_write_kv,
               moe_triton.fused_moe)
