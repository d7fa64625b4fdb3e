"""Model building blocks over flat [num_tokens, hidden] batches.

Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)``; fused layers
(QKV, gate/up) take their checkpoint shards through it, and tensor-parallel sharding will narrow
the loaded weight there too (``tp_rank``/``tp_size`` are 0/1 for now).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels.rms_norm import rms_norm_ref
from tandem.kernels.rope_kv import rotate_neox

if TYPE_CHECKING:
    from tandem.model.cpu_gemm import GemmRoute
    from tandem.quantization.schemes import QuantizedWeight

# (param, loaded weight, shard id or None) -> None: copies the checkpoint tensor into the parameter
WeightLoader = Callable[..., None]


class WeightParameter(nn.Parameter):
    """A parameter that says how a checkpoint tensor is loaded into it, and which checkpoint shards
    it is made of: ``(None,)`` for a plain tensor, the shard ids of a fused one (q/k/v, gate/up).
    The loader fails unless every listed shard was loaded exactly as listed."""

    weight_loader: WeightLoader
    shard_ids: tuple[object, ...]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


def weight_param(*shape: int, dtype: torch.dtype, loader: WeightLoader = default_weight_loader) -> WeightParameter:
    """An uninitialised parameter the checkpoint fills whole (one shard, None)."""
    p = WeightParameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    p.shard_ids = (None,)
    return p


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           route: GemmRoute | None = None) -> torch.Tensor:
    """x [M, in] @ weight[out, in].T (+ bias). ``route``: the weight packed for oneDNN and the row
    counts where that is faster on this CPU (tandem/model/cpu_gemm.py). For a few rows in fp32 on
    CPU the BLAS is faster asked for (weight @ x.T).T (measured 1.2-1.7x for 8 <= M <= 48 on the
    bench shapes, on an Intel Xeon)."""
    if route is not None and x.dim() == 2 and route.wants_onednn(x.shape[0]):
        return route(x, bias)
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and 8 <= x.shape[0] <= 48:
        out = torch.mm(weight, x.t()).t().contiguous()
        return out.add_(bias) if bias is not None else out
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight_param(out_features, in_features, dtype=dtype)
        self.bias = weight_param(out_features, dtype=dtype) if bias else None
        self.gemm_route: GemmRoute | None = None  # set by plan_cpu_gemm
        # set by tandem.quantization.apply_precision, which then empties self.weight
        self.quant: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant(x, self.bias)
        return linear(x, self.weight, self.bias, self.gemm_route)


class ShardedLinear(Linear):
    """Output dim is a concatenation of named shards (q/k/v, or gate/up) loaded separately."""

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias, dtype)
        self.shard_offsets: dict = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard
                param.shard_ids = tuple(shard_sizes)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object) -> None:
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} != {tuple(target.shape)}")
        target.copy_(loaded)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in fp32, scale in the input dtype, exactly as transformers does.
        return rms_norm_ref(x, self.weight, self.eps)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight_param(vocab_size, dim, dtype=dtype)
        self.gemm_route: GemmRoute | None = None  # as the LM head: set by plan_cpu_gemm
        # as the LM head: set by apply_precision (which keeps the weight when the embeddings share it)
        self.quant: QuantizedWeight | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This table used as the LM head: hidden [T, dim] -> [T, vocab] in hidden's dtype."""
        if self.quant is not None:
            return self.quant(hidden, None)
        return linear(hidden, self.weight, route=self.gemm_route)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32) and attention scaling for the rope types we support."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    s = scaling or {}
    rope_type = s.get("rope_type") or s.get("type") or "default"
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(s["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, s), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, s)
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3, yarn are)")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN: per frequency, a ramp between the original (extrapolated) and the factor-interpolated
    inverse frequency, by how many rotations it makes over the original context (beta_fast/slow);
    cos/sin scaled by the attention factor (given, or from factor, mscale and mscale_all_dim)."""
    factor, old_len = float(s["factor"]), float(s["original_max_position_embeddings"])
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else yarn_mscale(factor))
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency, 0: interpolated
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@functools.lru_cache(maxsize=8)
def _rope_tables(head_dim: int, max_positions: int, theta: float, scaling_json: str,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim // 2] fp32 (a long-context model's are hundreds of MB)."""
    inv_freq, attn_scale = rope_inv_freq(head_dim, theta, json.loads(scaling_json))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq.to(device)[None, :]
    return freqs.cos() * attn_scale, freqs.sin() * attn_scale


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), cos/sin cached for every position."""

    cos: torch.Tensor  # [max_positions, head_dim // 2] fp32 buffers
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        cos, sin = _rope_tables(head_dim, max_positions, theta, json.dumps(scaling, sort_keys=True),
                                torch.empty(0).device)
        self.register_buffer("cos", cos, persistent=False)  # shared by every layer: one table in memory
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim], k [T, kv_heads, head_dim]; a table narrower than head_dim (partial
        rotary) rotates the leading dims and passes the rest through."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        rotary = 2 * cos.shape[-1]
        if rotary == q.shape[-1]:
            return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
        return (torch.cat((rotate_neox(q[..., :rotary], cos, sin), q[..., rotary:]), dim=-1),
                torch.cat((rotate_neox(k[..., :rotary], cos, sin), k[..., rotary:]), dim=-1))
