"""SiLU-and-mul: ``[T, 2 * N]`` (gate then up) -> ``silu(gate) * up`` ``[T, N]``. Torch reference
and Triton kernel with the same signature; silu in fp32, product in the input dtype."""

from __future__ import annotations

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


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows, n = x2.shape[0], x2.shape[1] // 2
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x2, y, n, x2.stride(0), y.stride(0), BLOCK=block)
    return y.view(*x.shape[:-1], n)
