"""Precision schemes: what a linear layer's weight is stored as, and how it is multiplied.

A scheme turns a loaded float weight ``[N out, K in]`` into a ``QuantizedWeight`` module that
replaces the layer's matmul (``Linear.quant``). Every ``QuantizedWeight`` computes
``x @ dequantize().T + bias`` in the activation's dtype; the formats and their references are in
``tandem/kernels/quant.py``. On a CUDA GPU the Triton kernels of ``tandem/kernels/quant_triton.py``
run; on a CPU:

* int8 runs, per row count, the fastest of tandem's C++ kernel (``tandem/kernels/csrc/
  cpu_int8_linear.cpp``: fp32 activations, the weights widened in L1), torch's
  ``_weight_int8pack_mm`` (bf16 activations) and dequantize + matmul, measured per weight shape
  when the model is quantized (as ``tandem/model/cpu_gemm.py`` measures its GEMMs);
* fp8, mxfp4 and nvfp4 are stored packed and dequantized for each product: a CPU has no FP8 or
  FP4 arithmetic, so they save memory, not time (and FP4 is emulated on every GPU before Blackwell).
"""

from __future__ import annotations

import bisect
import functools
import importlib
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import cpu_kernels
from tandem.kernels import quant as Q
from tandem.model.cpu_gemm import best_ms

FLOAT_SCHEMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_SCHEMES = ("fp8", "fp8_block", "int8", "mxfp4", "nvfp4")
SCHEMES = QUANTIZED_SCHEMES + tuple(FLOAT_SCHEMES)
QUANTIZATION_METHODS = ("fp8", "int8", "mxfp4", "nvfp4")  # the online ``quantization`` flag's values


def _triton(name: str) -> Callable[..., torch.Tensor]:
    return getattr(importlib.import_module("tandem.kernels.quant_triton"), name)


class QuantizedWeight(nn.Module):
    """A linear weight in a storage format; ``forward(x [M, K], bias) -> [M, N]`` in x's dtype."""

    scheme: ClassVar[str]
    out_features: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.scheme}, out={self.out_features}, in={self.in_features}, bytes={self.nbytes}"

    def _dequantized_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class FloatWeight(QuantizedWeight):
    """The layer kept in a float type (``bf16``, ``fp16``, ``fp32``) whatever the model's dtype."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme  # type: ignore[misc]  # one class serves the three float schemes
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(FLOAT_SCHEMES[scheme]).contiguous())

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dt = self.weight.dtype
        return F.linear(x.to(dt), self.weight, None if bias is None else bias.to(dt)).to(x.dtype)


# int8 on a CPU: rows up to these limits take the path measured fastest at the matching probe row count
INT8_PROBE_ROWS = (1, 8, 32, 128)
INT8_BUCKET_LIMITS = (2, 16, 64)
# tandem: the C++ kernel (fp32 activations); int8pack: torch's _weight_int8pack_mm (bf16 activations);
# dequant: the weight widened to the activations' dtype, then torch's matmul
INT8_CPU_PATHS = ("tandem", "int8pack", "dequant")


class Int8Weight(QuantizedWeight):
    scheme = "int8"
    q: torch.Tensor
    scale: torch.Tensor
    scale_bf16: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())
        # CPU: the path per probe row count (measure_cpu_routes); dequantize + matmul until measured
        self.cpu_routes: tuple[str, ...] = ("dequant",) * len(INT8_PROBE_ROWS)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        # NOTE: torch 2.13's _weight_int8pack_mm returns garbage or crashes unless K is a multiple of
        # its vector width (measured: on AVX2 K = 100 wrong at 3 rows and a segfault at 8; on AVX-512
        # K = 200 a segfault from 2 rows, K = 24 wrong at 1): never taken unless K % 16 == 0
        self.int8pack_ok = self.in_features % 16 == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(*Q.quantize_int8(weight))

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_int8(self.q, self.scale)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _triton("int8_linear")(x, self.q, self.scale, bias)
        rows = x.shape[0] if x.dim() == 2 else x.numel() // max(1, x.shape[-1])
        return self.run_cpu(self.cpu_routes[bisect.bisect_left(INT8_BUCKET_LIMITS, rows)], x, bias)

    def run_cpu(self, path: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if path == "tandem":
            return cpu_kernels.int8_linear(x, self.q, self.scale, bias)
        if path == "int8pack" and x.dim() == 2 and self.int8pack_ok:
            out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale_bf16).to(x.dtype)
            return out.add_(bias.to(x.dtype)) if bias is not None else out
        return self._dequantized_linear(x, bias)

    def measure_cpu_routes(self, cache: dict[tuple[int, int, torch.dtype], tuple[str, ...]],
                           dtype: torch.dtype) -> None:
        """Time each CPU path once per (shape, activation dtype) and keep the fastest per row count."""
        key = (self.out_features, self.in_features, dtype)
        if key not in cache:
            paths = [p for p in INT8_CPU_PATHS if (p != "tandem" or cpu_kernels.available())
                     and (p != "int8pack" or self.int8pack_ok)]
            xs = [torch.randn(rows, self.in_features, dtype=dtype) for rows in INT8_PROBE_ROWS]
            cache[key] = tuple(self._fastest(paths, x) for x in xs)
        self.cpu_routes = cache[key]

    def _fastest(self, paths: list[str], x: torch.Tensor) -> str:
        runs = {path: functools.partial(self.run_cpu, path, x, None) for path in paths}
        for run in runs.values():
            run()  # warm: first calls allocate
        times = {path: best_ms(run, repeats=3) for path, run in runs.items()}
        return min(times, key=times.__getitem__)


class Fp8Weight(QuantizedWeight):
    """e4m3 per output channel (``fp8``) or per 128x128 block (``fp8_block``). On a GPU the
    per-channel form runs W8A8 (activations quantized per token); blocks run W8A16."""

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """scale: [N] per channel, or [ceil(N/128), ceil(K/128)] per block."""
        super().__init__()
        self.scheme = "fp8_block" if scale.dim() == 2 else "fp8"  # type: ignore[misc]
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_float(cls, weight: torch.Tensor, block: bool) -> Fp8Weight:
        return cls(*Q.quantize_fp8(weight, block=block))

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_fp8(self.q, self.scale)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            kernel = "fp8_linear" if self.scale.dim() == 2 else "fp8_w8a8_linear"
            return _triton(kernel)(x, self.q, self.scale, bias)
        return self._dequantized_linear(x, bias)


class Mxfp4Weight(QuantizedWeight):
    scheme = "mxfp4"
    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Mxfp4Weight:
        return cls(*Q.quantize_mxfp4(weight))

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_mxfp4(self.packed, self.scales)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _triton("mxfp4_linear")(x, self.packed, self.scales, bias)
        return self._dequantized_linear(x, bias)


class Nvfp4Weight(QuantizedWeight):
    scheme = "nvfp4"
    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("global_scale", global_scale.float())

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Nvfp4Weight:
        return cls(*Q.quantize_nvfp4(weight))

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_nvfp4(self.packed, self.scales, self.global_scale)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _triton("nvfp4_linear")(x, self.packed, self.scales, self.global_scale, bias)
        return self._dequantized_linear(x, bias)


class Int4Weight(QuantizedWeight):
    """Symmetric int4 with a scale per group of input columns (compressed-tensors' W4A16): codes
    q + 8 packed two per byte, element 2i in the low nibble. Loaded from checkpoints only; computed
    by dequantizing (no int4 kernel yet)."""

    scheme = "int4"
    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], in_features
        if in_features % scales.shape[1]:
            raise ValueError(f"int4: {scales.shape[1]} scale groups do not divide {in_features} input columns")
        self.group_size = in_features // scales.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales.float())

    def dequantize(self) -> torch.Tensor:
        q = Q.unpack_fp4(self.packed)[:, : self.in_features].to(torch.int8) - 8
        return q.float() * self.scales.repeat_interleave(self.group_size, dim=1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._dequantized_linear(x, bias)


class ConcatWeight(QuantizedWeight):
    """A fused layer (q/k/v, gate/up) whose parts a checkpoint quantized separately, each with its
    own scales: the parts' outputs side by side, in the fused layer's shard order."""

    def __init__(self, parts: list[QuantizedWeight]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.scheme = "+".join(sorted({p.scheme for p in parts}))  # type: ignore[misc]
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])  # type: ignore[operator]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.cat([p(x, None) for p in self.parts], dim=-1)
        return out.add_(bias.to(out.dtype)) if bias is not None else out


# the input dimension a scheme needs to divide (fp4 scales cover whole blocks along K)
K_MULTIPLE = {"mxfp4": Q.MX_BLOCK, "nvfp4": Q.NV_BLOCK}


def check_scheme(scheme: str, in_features: int) -> str | None:
    """Why a weight with ``in_features`` inputs cannot take ``scheme``, or None if it can."""
    if scheme not in SCHEMES:
        return f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})"
    multiple = K_MULTIPLE.get(scheme)
    if multiple and in_features % multiple:
        return f"{scheme} needs the input size to be a multiple of {multiple}, this layer's is {in_features}"
    return None


def quantize_weight(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    reason = check_scheme(scheme, weight.shape[1])
    if reason:
        raise ValueError(reason)
    w = weight.detach()
    if scheme in FLOAT_SCHEMES:
        return FloatWeight(w, scheme)
    if scheme in ("fp8", "fp8_block"):
        return Fp8Weight.from_float(w, block=scheme == "fp8_block")
    if scheme == "int8":
        return Int8Weight.from_float(w)
    return Mxfp4Weight.from_float(w) if scheme == "mxfp4" else Nvfp4Weight.from_float(w)
