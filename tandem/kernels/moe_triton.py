"""Fused MoE as two grouped GEMMs in Triton (GPU; CPU under ``TRITON_INTERPRET=1``), the same
signature as ``moe.fused_moe_ref``.

1. ``align_by_expert``: the T * k (token, expert) assignments sorted by expert, each expert's run
   padded to a multiple of ``BLOCK_M`` with the sentinel ``T * k``; one expert id per block of rows
   (-1 for the spare blocks at the end). The buffers have their largest possible size, so nothing
   is read back to the host (no sync; CUDA-graph safe).
2. ``_grouped_mm_kernel`` over those blocks: rows of one block share one expert's weight; the first
   GEMM reads token ``row // k`` of x and writes [T * k, 2I], the gated activation follows, the second
   GEMM reads row ``row`` and scales by the routing weight; the k rows of a token are then summed.
   An expert's bias (gpt-oss) is added to its GEMM's tile before the routing weight scales it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.activation import SILU, GatedActivation, gated_activation

# as in quant_triton: the interpreter multiplies bf16 tiles as raw 16-bit patterns, so there a bf16
# dot runs on fp32 copies (a bf16 x bf16 product is exact in fp32); GPUs dot bf16 directly
_FP32_DOT = bool(triton.knobs.runtime.interpret)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted assignment rows [max_rows] with sentinel T*k, expert id per block [max_rows // block_m])."""
    flat = topk_ids.reshape(-1)
    n, device = flat.numel(), flat.device
    max_rows = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    # NOTE: index_add_ and searchsorted, not bincount / repeat_interleave, which read sizes back
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).index_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    starts = (torch.cumsum(blocks, 0) - blocks) * block_m
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - first_of_expert[experts_sorted]
    sorted_rows = torch.full((max_rows,), n, dtype=torch.int32, device=device)
    sorted_rows[starts[experts_sorted] + rank] = order.to(torch.int32)
    block_index = torch.arange(max_rows // block_m, device=device)
    expert_ids = torch.searchsorted(torch.cumsum(blocks, 0), block_index, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_rows, expert_ids


@triton.jit
def _grouped_mm_kernel(A, W, OUT, ROWS, EXPERTS, SCALE, BIAS, num_rows, N, K, stride_am, stride_we, stride_wn,
                       stride_om, stride_be, ROW_DIV: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       FP32_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(EXPERTS + pid_m)
    if expert < 0:
        return
    rows = tl.load(ROWS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2**31
    valid = rows < num_rows
    a_rows = tl.where(valid, rows // ROW_DIV, 0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(A + a_rows[:, None] * stride_am + rk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + expert.to(tl.int64) * stride_we + rn[None, :] * stride_wn + rk[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        elif A.dtype.element_ty == tl.float32:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(BIAS + expert.to(tl.int64) * stride_be + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SCALED:
        acc *= tl.load(SCALE + rows, mask=valid, other=0.0)[:, None]
    tl.store(OUT + rows[:, None] * stride_om + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


# Tile configurations as data: per device name (torch.cuda.get_device_name; "default" for any other
# device and the interpreter), rows (T * top_k assignments) up to ``max_rows`` -> tiles. The H200
# entry is the default's until a lent GPU has tuned it (scripts/gpu_check.sh runs the MoE kernels).
TILES: dict[str, list[dict]] = {
    "default": [
        {"max_rows": 64, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        {"max_rows": None, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    ],
    "NVIDIA H200": [  # untuned: the default's tiles
        {"max_rows": 64, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        {"max_rows": None, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    ],
}


def tiles_for(num_rows: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The tile entry for this many assignment rows on this device (fp32 halves BLOCK_K)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "default"
    entry = next(t for t in TILES.get(name, TILES["default"]) if t["max_rows"] is None or num_rows <= t["max_rows"])
    return {**entry, "BLOCK_K": entry["BLOCK_K"] // 2} if dtype == torch.float32 else entry


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, num_rows: int,
                row_div: int, scale: torch.Tensor | None, bias: torch.Tensor | None, tiles: dict) -> torch.Tensor:
    num_e, n, k = w.shape
    out = torch.empty((num_rows, n), dtype=a.dtype, device=a.device)
    block_m, block_n, block_k = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    grid = (experts.numel(), triton.cdiv(n, block_n))
    bias = bias.contiguous() if bias is not None else None
    _grouped_mm_kernel[grid](a, w, out, rows, experts, scale if scale is not None else out,
                             bias if bias is not None else out, num_rows, n, k, a.stride(0), w.stride(0),
                             w.stride(1), out.stride(0), bias.stride(0) if bias is not None else 0, ROW_DIV=row_div,
                             SCALED=scale is not None, HAS_BIAS=bias is not None,
                             FP32_DOT=_FP32_DOT and a.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
              activation: GatedActivation = SILU) -> torch.Tensor:
    """[T, H] -> [T, H]; see the module docstring."""
    t, top_k = topk_ids.shape
    num_rows = t * top_k
    tiles = tiles_for(num_rows, x.device, x.dtype)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    rows, experts = align_by_expert(topk_ids, w13.shape[0], tiles["BLOCK_M"])
    h = _grouped_mm(x, w13, rows, experts, num_rows, top_k, None, w13_bias, tiles)
    h = gated_activation(h, activation)
    weights = topk_weights.reshape(-1).float().contiguous()
    y = _grouped_mm(h, w2, rows, experts, num_rows, 1, weights, w2_bias, tiles)
    return y.view(t, top_k, -1).sum(dim=1)
