"""Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm, explicit head_dim),
and the Mixture-of-Experts members on the same attention: Qwen3-MoE, Mixtral, GLM-4-MoE and gpt-oss
(``moe.py``; gpt-oss adds attention sinks, biased o_proj and sliding-window layers alternating
with full ones), and DeepSeek-V3, whose attention is multi-head latent attention (``mla.py``) and
whose MoE routing is GLM-4-MoE's.

The differences between these families are flags on one module tree whose parameter names match
the Hugging Face checkpoints after fusing q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels.kv_quant import calibrated_scale, is_fp8
from tandem.kernels.ops import Ops
from tandem.model.attention import AttentionBackend, AttentionMetadata
from tandem.model.layers import Linear, RMSNorm, RotaryEmbedding, ShardedLinear, VocabEmbedding, weight_param
from tandem.model.mla import MLAArgs, MLAttention
from tandem.model.moe import MoEArgs, SparseMoE, map_expert_name


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # each token attends to itself and the window - 1 before it
    moe: MoEArgs | None = None  # sparse MLP layers (Qwen3-MoE, Mixtral, GLM-4-MoE, gpt-oss)
    rotary_dim: int | None = None  # < head_dim: only the first rotary_dim dims rotate (GLM-4-MoE)
    sliding_layers: frozenset[int] | None = None  # the layers sliding_window applies to; None: all
    o_bias: bool = False  # o_proj has a bias (Llama / Qwen3 / gpt-oss with attention_bias)
    attention_sinks: bool = False  # a learned sink logit per head (gpt-oss)
    # DeepSeek-V3's latent attention; then the cache has one KV head of mla.cache_width, V sharing K's tensor
    mla: MLAArgs | None = None

    @property
    def values_share_keys(self) -> bool:
        """The KV cache is one tensor per layer, bound as both K and V (MLA's latent rows)."""
        return self.mla is not None

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, cfg: dict, family: str) -> LlamaArgs:
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if cfg.get("hidden_act", "silu") != "silu":  # gpt-oss says silu; its experts' SwiGLU is in MoEArgs
            raise NotImplementedError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu is)")
        mla = MLAArgs.from_hf(cfg, rope) if family in ("deepseek_v2", "deepseek_v3") else None
        methods = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}.get(family)
        if methods and cfg.get("topk_method", methods[0]) not in methods:
            raise NotImplementedError(f"{family} topk_method {cfg['topk_method']!r} is not supported "
                                      f"({', '.join(methods)} are)")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=1 if mla else cfg.get("num_key_value_heads") or heads,
            head_dim=mla.cache_width if mla else cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)) and family not in ("qwen2", "glm4_moe"),
            attention_sinks=family == "gpt_oss",
            sliding_layers=_sliding_layers(cfg, family),
            mla=mla,
            qk_norm=family in ("qwen3", "qwen3_moe") or bool(cfg.get("use_qk_norm", False)),
            rotary_dim=_rotary_dim(cfg, rope, cfg.get("head_dim") or cfg["hidden_size"] // heads),
            sliding_window=sliding_window_of(cfg, family),
            moe=MoEArgs.from_hf(cfg, family, cfg["num_hidden_layers"]),
        )


def _rotary_dim(cfg: dict, rope: dict, head_dim: int) -> int | None:
    """head_dim * partial_rotary_factor where that is below head_dim, else None (all dims rotate)."""
    factor = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * factor)
    return dim if dim < head_dim else None


def sliding_window_of(cfg: dict, family: str) -> int | None:
    """Mistral applies ``sliding_window`` to every layer, gpt-oss to its ``sliding_attention`` layers
    (``_sliding_layers``). Qwen2/3 only with ``use_sliding_window`` and then per layer
    (``max_window_layers``), which is not supported: NotImplementedError."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    if family in ("mistral", "mixtral", "gpt_oss"):
        return int(window)
    if cfg.get("use_sliding_window"):
        raise NotImplementedError(f"{family} with use_sliding_window (per-layer windows) is not supported")
    return None


def _sliding_layers(cfg: dict, family: str) -> frozenset[int] | None:
    """gpt-oss: the layers ``layer_types`` names ``sliding_attention`` (default: the even ones)."""
    if family != "gpt_oss":
        return None
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(cfg["num_hidden_layers"])]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise NotImplementedError(f"gpt_oss layer_types {sorted(unknown)} are not supported")
    return frozenset(i for i, kind in enumerate(types) if kind == "sliding_attention")


class Attention(nn.Module):
    k_scale: torch.Tensor  # buffers (register_buffer), declared for the type checker
    v_scale: torch.Tensor

    def __init__(self, a: LlamaArgs, dtype: torch.dtype, backend: AttentionBackend,
                 input_size: int | None = None, layer: int = 0) -> None:
        """input_size: the width q/k/v are projected from, when not the hidden size (EAGLE-3's
        [embedding, feature] input). layer: this layer's index (its sliding window)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.scale = a.head_dim ** -0.5
        self.sliding_window = a.window_of(layer)
        self.qkv_proj = ShardedLinear(input_size or a.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
                                      bias=a.qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, a.hidden_size, bias=a.o_bias, dtype=dtype)
        # gpt-oss: one sink logit per head, kept in fp32 (the kernels softmax in fp32)
        self.sinks = weight_param(a.num_heads, dtype=torch.float32) if a.attention_sinks else None
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, dtype)
        self.qk_norm = a.qk_norm
        self.rotary = RotaryEmbedding(a.rotary_dim or a.head_dim, a.max_position_embeddings, a.rope_theta,
                                      a.rope_scaling)
        self.partial_rotary = a.rotary_dim is not None  # the fused rope kernels rotate whole heads only
        self.backend = backend
        # Bound by the runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # FP8 KV cache scales (fp32 [1]; used only when the cache is FP8): the checkpoint's
        # ``self_attn.k_scale``/``v_scale`` if it has them, else 1.0, or calibrated on the first batch
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.calibrate_kv_scales = False  # set by the runner until its first step has run

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # NOTE: calibration needs the rotated keys before they are written: that step rotates apart
        fused_rope = None if self.calibrate_kv_scales or self.partial_rotary else self.backend.ops.rope_and_write_kv
        scales = (self.k_scale, self.v_scale)
        if fused_rope is not None:
            q, k = fused_rope(positions, q, k, v, self.rotary.cos, self.rotary.sin, self.k_cache, self.v_cache,
                              meta.slot_mapping, *scales)
            fresh = None if is_fp8(self.k_cache.dtype) else (k, v)  # an FP8 cache holds a rounded copy
            out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, fresh,
                                      *scales, sinks=self.sinks)
        else:
            q, k = self.rotary(positions, q, k)
            if self.calibrate_kv_scales:
                self.k_scale.copy_(calibrated_scale(k, self.k_cache.dtype))
                self.v_scale.copy_(calibrated_scale(v, self.v_cache.dtype))
            out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                                       *scales, sinks=self.sinks)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, ops: Ops) -> None:
        super().__init__()
        self.gate_up_proj = ShardedLinear(hidden, {0: inter, 1: inter}, bias=False, dtype=dtype)
        self.down_proj = Linear(inter, hidden, bias=False, dtype=dtype)
        self.silu_and_mul = ops.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, dtype: torch.dtype, backend: AttentionBackend, index: int,
                 input_norm: bool = True) -> None:
        """input_norm False: attention reads the layer's input as is (an EAGLE head's first layer)."""
        super().__init__()
        self.self_attn = self._attention(a, dtype, backend, index)
        self.mlp = self._mlp(a, dtype, backend.ops, index)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype) if input_norm else None
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.ops = backend.ops

    @staticmethod
    def _attention(a: LlamaArgs, dtype: torch.dtype, backend: AttentionBackend, index: int) -> Attention | MLAttention:
        if a.mla is None:
            return Attention(a, dtype, backend, layer=index)
        rotary = RotaryEmbedding(a.mla.qk_rope_head_dim, a.max_position_embeddings, a.rope_theta, a.rope_scaling)
        return MLAttention(a.mla, a.hidden_size, a.num_heads, rotary, a.qkv_bias, dtype, backend)

    @staticmethod
    def _mlp(a: LlamaArgs, dtype: torch.dtype, ops: Ops, index: int) -> nn.Module:
        moe = a.moe
        if moe is None or index not in moe.sparse_layers:
            return MLP(a.hidden_size, a.intermediate_size, dtype, ops)
        shared = (MLP(a.hidden_size, moe.intermediate_size * moe.num_shared_experts, dtype, ops)
                  if moe.num_shared_experts else None)
        return SparseMoE(a.hidden_size, moe, dtype, ops.fused_moe, shared)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        attn = self.self_attn(positions, h if norm1 is None else self.ops.rms_norm(h, norm1.weight, norm1.eps), meta)
        x, h = self.ops.add_rms_norm(attn, h, norm2.weight, norm2.eps)  # h += attn; x = norm2(h)
        return h + self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs, dtype: torch.dtype, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(a.vocab_size, a.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(a, dtype, backend, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.ops = backend.ops
        # EAGLE-3 reads the residual stream entering these layers (set by its drafter); each forward
        # leaves them in aux_hidden_states, in this order
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        aux: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_hidden_layers:
                aux[i] = h
            h = layer(positions, h, meta)
        if self.aux_hidden_layers:
            self.aux_hidden_states = [aux[i] for i in self.aux_hidden_layers]
        return self.ops.rms_norm(h, self.norm.weight, self.norm.eps)


# checkpoint tensor suffix -> the attention layer's FP8 KV cache scale buffer
KV_SCALE_NAMES = {".self_attn.k_scale": ".self_attn.k_scale", ".self_attn.v_scale": ".self_attn.v_scale",
                  ".self_attn.k_proj.output_scale": ".self_attn.k_scale",
                  ".self_attn.v_proj.output_scale": ".self_attn.v_scale"}


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, hf_config: dict, family: str, dtype: torch.dtype, backend: AttentionBackend) -> None:
        super().__init__()
        self.args = a = LlamaArgs.from_hf(hf_config, family)
        self.model = LlamaModel(a, dtype, backend)
        if a.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = VocabEmbedding(a.vocab_size, a.hidden_size, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden).float()

    def attention_layers(self) -> list[Attention | MLAttention]:
        layers = []
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)  # LlamaModel.layers holds nothing else
            layers.append(layer.self_attn)
        return layers

    def _beyond_last_layer(self, name: str) -> bool:
        if not name.startswith("model.layers."):
            return False
        index = name.split(".")[2]
        return index.isdigit() and int(index) >= self.args.num_layers

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (our parameter name, shard id); None to skip the tensor."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.args.tie_word_embeddings:
            return None
        if self._beyond_last_layer(name):
            return None  # GLM-4.5's multi-token-prediction layers (speculative decoding, not served yet)
        expert = map_expert_name(name)
        if expert is not None:
            return expert
        # the router: Mixtral's block_sparse_moe.gate, gpt-oss's mlp.router
        name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.").replace(".mlp.router.", ".mlp.gate.")
        if self.args.mla is not None and ".self_attn." in name:
            return name, None  # MLA's projections are loaded as they are named (its q_proj is not fused)
        for suffix, scale in KV_SCALE_NAMES.items():  # FP8 KV cache scales (vLLM / compressed-tensors)
            if name.endswith(suffix):
                return name.removesuffix(suffix) + scale, None
        return self.fused_name(name)

    @classmethod
    def fused_name(cls, name: str) -> tuple[str, object]:
        """A checkpoint tensor's name -> its fused parameter (q/k/v, gate/up) and shard id, or itself."""
        for frag, (fused, shard) in cls.stacked_params.items():
            if frag in name:
                return name.replace(frag, fused), shard
        return name, None
