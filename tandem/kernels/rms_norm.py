"""RMSNorm, alone and fused with the residual add before it (``h = x + residual; y = norm(h)``).
Torch references and Triton kernels with the same signatures. Numerics follow transformers:
normalise in fp32, cast to the input dtype, then scale by the weight in that dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(residual + x), residual + x)."""
    h = residual + x
    return rms_norm_ref(h, weight, eps), h


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, n_cols, stride_x, stride_r, stride_y, stride_h, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=ok, other=0.0)  # in the input dtype, as torch adds
        tl.store(H + row * stride_h + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x.dtype)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    x2 = _rows(x)
    rows, cols = x2.shape
    y = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    r2 = _rows(residual) if residual is not None else x2
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, y, h, cols, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                                  eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols))
    return y.view(x.shape), h.view(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., cols] -> [rows, cols] with unit column stride (any row stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)
