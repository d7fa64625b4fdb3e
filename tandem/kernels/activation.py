"""Gated activations, ``[T, 2 * N]`` (gate then up) -> ``[T, N]``: SiLU-and-mul (``silu(gate) * up``;
silu in fp32, product in the input dtype) and gpt-oss's clamped SwiGLU (``GatedActivation``). Torch
references and Triton kernels with the same signatures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(X, Y, n, stride_x, stride_y, BLOCK: tl.constexpr):
    row, col_block = tl.program_id(0), tl.program_id(1)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(X + row * stride_x + n + cols, mask=ok, other=0.0)
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    tl.store(Y + row * stride_y + cols, (act.to(tl.float32) * up.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)


def _gated_launch(kernel: triton.JITFunction, x: torch.Tensor, *scalars: float) -> torch.Tensor:
    """[..., 2N] -> [..., N]: one program per row and block of N columns (gate at col, up at N + col)."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows, n = x2.shape[0], x2.shape[1] // 2
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, triton.next_power_of_2(n))
        kernel[(rows, triton.cdiv(n, block))](x2, y, n, x2.stride(0), y.stride(0), *scalars, BLOCK=block)
    return y.view(*x.shape[:-1], n)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated_launch(_silu_and_mul_kernel, x)


@dataclass(frozen=True)
class GatedActivation:
    """How an MLP's ``[T, 2 * N]`` (gate then up) becomes ``[T, N]``: ``silu`` is silu(gate) * up;
    ``swigluoai`` is gpt-oss's clamped SwiGLU, gate clamped above and up on both sides at ``limit``,
    then ``(up + 1) * gate * sigmoid(alpha * gate)`` (vLLM's name for it)."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in ("silu", "swigluoai"):
            raise ValueError(f"gated activation {self.kind!r} unknown; silu and swigluoai are")


SILU = GatedActivation()


def swiglu_oai_ref(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def gated_activation_ref(x: torch.Tensor, act: GatedActivation) -> torch.Tensor:
    return silu_and_mul_ref(x) if act.kind == "silu" else swiglu_oai_ref(x, act.alpha, act.limit)


@triton.jit
def _swiglu_oai_kernel(X, Y, n, stride_x, stride_y, alpha, limit, BLOCK: tl.constexpr):
    row, col_block = tl.program_id(0), tl.program_id(1)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.minimum(tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32), limit)
    up = tl.load(X + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    glu = gate / (1.0 + tl.exp(-gate * alpha))
    tl.store(Y + row * stride_y + cols, ((up + 1.0) * glu).to(Y.dtype.element_ty), mask=ok)


def gated_activation(x: torch.Tensor, act: GatedActivation) -> torch.Tensor:
    """The Triton kernels of ``gated_activation_ref`` (fp32 inside, the input dtype out)."""
    if act.kind == "silu":
        return silu_and_mul(x)
    return _gated_launch(_swiglu_oai_kernel, x, act.alpha, act.limit)
