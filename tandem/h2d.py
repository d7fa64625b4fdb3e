"""Host-to-device copies for per-step inputs without a host sync.

On CUDA the host array is staged in pinned memory (PyTorch's caching host allocator keeps that
buffer until the copy has run) and copied with ``non_blocking=True``, so the CPU goes on preparing
while the GPU works. On a CPU device the tensor is used in place.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` without a host sync: a host source bound for a CUDA tensor is staged
    in pinned memory first (a pageable non-blocking copy would make the CPU wait)."""
    if dst.is_cuda and not src.is_cuda:
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)
