"""Multi-head latent attention (MLA: DeepSeek-V2/V3), over a paged cache of compressed latents.

Per token the cache holds one row of ``kv_lora_rank + qk_rope_head_dim`` values: the normalised
latent ``c`` (``kv_a_layernorm`` of the first ``kv_lora_rank`` outputs of ``kv_a_proj_with_mqa``)
then the rotated shared key ``k_pe`` (its last ``qk_rope_head_dim`` outputs). Nothing per head is
cached: DeepSeek-V3's 61 layers x 576 values per token, against 128 heads x (192 + 128) for full K/V.

Attention runs in the absorbed form for prefill and decode alike. ``kv_b_proj`` [H * (nope + v), L]
holds, per head, W_UK [nope, L] and W_UV [v, L]; head h's key for token j is (W_UK c_j, k_pe_j), so

    q_h . k_j = (W_UK^T q_nope_h) . c_j + q_pe_h . k_pe_j = q_abs_h . row_j

with ``q_abs_h = [W_UK^T q_nope_h, q_pe_h]``. That is multi-query attention with one KV head whose
key is the cached row: every paged-attention backend runs it unchanged, the cache bound as both K and
V (the layer's V cache is its K cache). The value read back is ``softmax . row``; its first L
entries are ``softmax . c``, which W_UV maps to head h's output; the rope part is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels.kv_quant import calibrated_scale
from tandem.kernels.rope_kv import rotate_neox
from tandem.model.attention import AttentionBackend, AttentionMetadata
from tandem.model.layers import Linear, RMSNorm, RotaryEmbedding, weight_param, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them with the default eps


@dataclass(frozen=True)
class MLAArgs:
    q_lora_rank: int | None  # None: q_proj straight from the hidden state (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # the rope dims come in (x0, x1), (x2, x3) pairs (DeepSeek-V3's default)
    softmax_scale: float  # (nope + rope) ** -0.5, times YaRN's mscale(mscale_all_dim) squared

    @property
    def cache_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, cfg: dict, rope: dict) -> MLAArgs:
        nope, rope_dim = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        scale = (nope + rope_dim) ** -0.5
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and rope.get("mscale_all_dim"):
            scale *= yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
        q_lora = cfg.get("q_lora_rank")
        return cls(int(q_lora) if q_lora else None, int(cfg["kv_lora_rank"]), nope, rope_dim, int(cfg["v_head_dim"]),
                   bool(cfg.get("rope_interleave", True)), scale)


class PlainWeight(nn.Module):
    """A weight the layer reads itself (``kv_b_proj``: split per head, never through a GEMM route
    or a quantization policy)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight_param(rows, cols, dtype=dtype)


class MLAttention(nn.Module):
    k_scale: torch.Tensor  # buffers (register_buffer), declared for the type checker
    v_scale: torch.Tensor

    def __init__(self, m: MLAArgs, hidden: int, num_heads: int, rotary: RotaryEmbedding, bias: bool,
                 dtype: torch.dtype, backend: AttentionBackend) -> None:
        super().__init__()
        self.m, self.num_heads, self.backend, self.rotary = m, num_heads, backend, rotary
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = Linear(hidden, num_heads * qk_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(m.q_lora_rank, num_heads * qk_dim, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(hidden, m.cache_width, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = PlainWeight(num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, dtype)
        self.o_proj = Linear(num_heads * m.v_head_dim, hidden, bias=bias, dtype=dtype)
        # Bound by the runner: [num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]; v_cache is k_cache
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # an FP8 cache's scale: the rows are written and read with k_scale only (K and V are one tensor)
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.calibrate_kv_scales = False

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, rope_dim] rotated; interleaved pairs are first gathered into halves, which is
        the same rotation of the same pairs (the dot products between rotated q and k are unchanged)."""
        if self.m.rope_interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return rotate_neox(x, cos, sin)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, L], W_UV [H, v, L]) as views of kv_b_proj."""
        m = self.m
        w = self.kv_b_proj.weight.view(self.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        m, t = self.m, x.shape[0]
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, self.num_heads, -1).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        cos, sin = self.rotary.cos[positions].unsqueeze(1), self.rotary.sin[positions].unsqueeze(1)
        row = torch.cat((self.kv_a_layernorm(latent), self._rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)), dim=-1)
        w_uk, w_uv = self._absorbed()
        q_abs = torch.cat((torch.einsum("thn,hnl->thl", q_nope, w_uk), self._rope(q_pe, cos, sin)), dim=-1)
        if self.calibrate_kv_scales:
            self.k_scale.copy_(calibrated_scale(row, self.k_cache.dtype))
        row = row.unsqueeze(1)  # one KV head
        out = self.backend.forward(q_abs, row, row, self.k_cache, self.v_cache, meta, m.softmax_scale, None,
                                   self.k_scale, self.k_scale)
        heads = torch.einsum("thl,hvl->thv", out[..., :m.kv_lora_rank], w_uv)
        return self.o_proj(heads.reshape(t, self.num_heads * m.v_head_dim))
