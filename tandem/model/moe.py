"""Sparse Mixture-of-Experts MLP blocks (Qwen3-MoE, Mixtral, GLM-4-MoE, gpt-oss): a router and
fused expert weights.

Experts are stored fused, as vLLM and transformers 5 keep them in memory: ``experts.gate_up_proj``
[E, 2I, H] (each expert's gate rows, then its up rows) and ``experts.down_proj`` [E, H, I]. They
fill from each checkpoint layout: per-expert tensors (``experts.N.gate_proj/up_proj/down_proj``,
Mixtral's ``experts.N.w1/w3/w2``) through shard ids ``(N, "gate" | "up" | "down")``; the fused
3-D tensors as they are; or gpt-oss's fused tensors, transposed ([E, H, 2I], [E, I, H]) with gate
and up interleaved column by column, and per-expert biases (``gate_up_proj_bias`` [E, 2I] likewise
interleaved, ``down_proj_bias`` [E, H]). A later expert-parallel rank will load only its experts
through the same loader. The router (``gate``; gpt-oss's ``router``, with a bias) stays in the
model's float type and is never quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels.activation import SILU, GatedActivation, gated_activation_ref
from tandem.kernels.moe import grouped_sigmoid_topk, softmax_topk, topk_softmax
from tandem.model.cpu_gemm import GemmRoute
from tandem.model.layers import WeightParameter, default_weight_loader, linear, weight_param


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # the top-k weights sum to 1
    sparse_layers: frozenset[int]  # layers whose MLP is the MoE block (the others are dense)
    # softmax over all experts; sigmoid with grouped top-k (GLM-4-MoE); topk_softmax: softmax over the
    # top-k logits only (gpt-oss)
    scoring: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0  # routed_scaling_factor
    num_shared_experts: int = 0  # an always-on MLP of num_shared * intermediate_size beside the routed ones
    router_fp32: bool = False  # the router's weight and bias kept and applied in fp32
    router_bias: bool = False  # the router's logits have a bias (gpt-oss)
    expert_bias: bool = False  # each expert's GEMMs have biases (gpt-oss)
    activation: GatedActivation = SILU
    gpt_oss_layout: bool = False  # fused experts on disk transposed, gate/up interleaved (module docstring)

    @classmethod
    def from_hf(cls, cfg: dict, family: str, num_layers: int) -> MoEArgs | None:
        # the shipped checkpoints say num_experts (Qwen) or num_local_experts (Mixtral); transformers 5
        # writes num_local_experts for both
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        if family == "mixtral":
            return cls(num_experts, cfg["num_experts_per_tok"], cfg["intermediate_size"], True,
                       frozenset(range(num_layers)))
        if family == "qwen3_moe":
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            dense = set(cfg.get("mlp_only_layers") or [])
            sparse = frozenset(i for i in range(num_layers)
                               if i not in dense and num_experts > 0 and (i + 1) % step == 0)
            return cls(num_experts, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                       bool(cfg.get("norm_topk_prob", False)), sparse)
        if family in ("deepseek_v2", "glm4_moe", "deepseek_v3"):
            # shared experts, the first layers dense, an fp32 router and scaled weights; V2 softmaxes,
            # its groups only with group_limited_greedy; V3 and GLM choose by sigmoid plus bias (noaux_tc)
            v2 = family == "deepseek_v2"
            grouped = not v2 or cfg.get("topk_method") == "group_limited_greedy"
            return cls(int(cfg.get("n_routed_experts") or num_experts), cfg["num_experts_per_tok"],
                       cfg["moe_intermediate_size"], bool(cfg.get("norm_topk_prob", not v2)),
                       frozenset(range(int(cfg.get("first_k_dense_replace", 0)), num_layers)),
                       scoring="softmax" if v2 else "sigmoid",
                       num_groups=int(cfg.get("n_group") or 1) if grouped else 1,
                       topk_groups=int(cfg.get("topk_group") or 1) if grouped else 1,
                       scaling=float(cfg.get("routed_scaling_factor", 1.0)),
                       num_shared_experts=int(cfg.get("n_shared_experts", 0) or 0), router_fp32=True)
        if family == "gpt_oss":
            swiglu = GatedActivation("swigluoai", float(cfg.get("swiglu_alpha", 1.702)),
                                     float(cfg.get("swiglu_limit", 7.0)))
            return cls(num_experts, cfg["num_experts_per_tok"], cfg["intermediate_size"], True,
                       frozenset(range(num_layers)), scoring="topk_softmax", router_bias=True, expert_bias=True,
                       activation=swiglu, gpt_oss_layout=True)
        return None


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, bias: bool = False,
                 gpt_oss_layout: bool = False) -> None:
        super().__init__()
        self.num_experts, self.inter, self.gpt_oss_layout = num_experts, inter, gpt_oss_layout
        self.gate_up_proj = self._param((num_experts, 2 * inter, hidden), dtype, ("gate", "up"))
        self.down_proj = self._param((num_experts, hidden, inter), dtype, ("down",))
        self.gate_up_proj_bias = weight_param(num_experts, 2 * inter, dtype=dtype, loader=self._load) if bias else None
        self.down_proj_bias = weight_param(num_experts, hidden, dtype=dtype, loader=self._load) if bias else None
        # on a CPU, each expert's weights packed for oneDNN where that is faster (plan_cpu_gemm):
        # (gate_up routes, down routes), one per expert
        self.gemm_routes: tuple[list[GemmRoute], list[GemmRoute]] | None = None

    def _param(self, shape: tuple[int, ...], dtype: torch.dtype, parts: tuple[str, ...]) -> WeightParameter:
        p = WeightParameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        p.weight_loader = self._load
        # every expert's parts; the whole fused tensor (shard None) fills them all at once
        p.shard_ids = tuple((e, part) for e in range(shape[0]) for part in parts)
        p.whole_fills_shards = True  # type: ignore[attr-defined]
        return p

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # a fused tensor (transformers-5 style, or gpt-oss's)
            default_weight_loader(param, self._from_gpt_oss(param, loaded) if self.gpt_oss_layout else loaded)
            return
        expert, part = cast(tuple[int, str], shard_id)
        target = param.data[expert]
        if part in ("gate", "up"):
            target = target.narrow(0, 0 if part == "gate" else self.inter, self.inter)
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert} {part}: weight shape {tuple(loaded.shape)} != {tuple(target.shape)}")
        target.copy_(loaded)


    def _from_gpt_oss(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """gpt-oss's tensor -> ours: [E, H, 2I] / [E, I, H] transposed; gate/up de-interleaved."""
        if param is self.gate_up_proj or param is self.down_proj:
            loaded = loaded.transpose(1, 2)
        if param is self.gate_up_proj or param is self.gate_up_proj_bias:
            loaded = torch.cat([loaded[:, 0::2], loaded[:, 1::2]], dim=1)
        return loaded


class Router(nn.Module):
    """The expert scores' weight [E, H] (``mlp.gate.weight``; not a Linear, so never quantized), its
    bias where the model has one (gpt-oss), and, for sigmoid routing, the correction bias added when
    choosing (``e_score_correction_bias``)."""

    def __init__(self, moe: MoEArgs, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        dtype = torch.float32 if moe.router_fp32 else dtype
        self.weight = weight_param(moe.num_experts, hidden, dtype=dtype)
        self.e_score_correction_bias = (weight_param(moe.num_experts, dtype=torch.float32)
                                        if moe.scoring == "sigmoid" else None)
        self.bias = weight_param(moe.num_experts, dtype=dtype) if moe.router_bias else None


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, moe: MoEArgs, dtype: torch.dtype, fused_moe: Callable,
                 shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = Router(moe, hidden, dtype)
        self.shared_experts = shared_experts  # an MLP every token goes through (GLM-4-MoE, DeepSeek)
        self.experts = FusedExperts(moe.num_experts, hidden, moe.intermediate_size, dtype, moe.expert_bias,
                                    moe.gpt_oss_layout)
        self.fused_moe = fused_moe
        # tokens routed to each expert since the runner last read them (index_add_: no host sync,
        # capturable in a CUDA graph); the load balancer of expert parallelism will read these too
        self.expert_tokens: torch.Tensor
        self.register_buffer("expert_tokens", torch.zeros(moe.num_experts, dtype=torch.int64), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, gate = self.moe, self.gate
        if m.scoring == "softmax":
            logits = F.linear(x.float(), gate.weight.float()) if m.router_fp32 else F.linear(x, gate.weight)
            weights, ids = softmax_topk(logits, m.top_k, m.renormalize, m.num_groups, m.topk_groups)
            return (weights * m.scaling if m.scaling != 1.0 else weights), ids
        if m.scoring == "topk_softmax":
            return topk_softmax(F.linear(x, gate.weight, gate.bias), m.top_k)
        assert gate.e_score_correction_bias is not None
        logits = F.linear(x.float(), gate.weight.float())
        return grouped_sigmoid_topk(logits, m.top_k, gate.e_score_correction_bias, m.num_groups, m.topk_groups,
                                    m.renormalize, m.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        flat = ids.reshape(-1)
        self.expert_tokens.index_add_(0, flat, torch.ones_like(flat))
        e = self.experts
        if e.gemm_routes is not None:
            out = routed_experts(x, e, weights, ids, self.moe.activation)
        else:
            out = self.fused_moe(x, e.gate_up_proj, e.down_proj, weights, ids, e.gate_up_proj_bias, e.down_proj_bias,
                                 self.moe.activation)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


def routed_experts(x: torch.Tensor, experts: FusedExperts, weights: torch.Tensor, ids: torch.Tensor,
                   activation: GatedActivation) -> torch.Tensor:
    """``fused_moe_ref`` on a CPU with each expert's GEMMs through its ``GemmRoute`` (oneDNN with the
    weight packed at load where that was measured faster, else the BLAS): the assignments sorted by
    expert, one pair of GEMMs per expert that has tokens."""
    assert experts.gemm_routes is not None
    routes13, routes2 = experts.gemm_routes
    b13, b2 = experts.gate_up_proj_bias, experts.down_proj_bias
    top_k, flat = ids.shape[1], ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k
    rows = x[tokens]
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    used = [e for e, n in enumerate(counts) if n]
    if not used:  # no tokens
        return torch.zeros_like(x)
    parts = rows.split([counts[e] for e in used])
    # NOTE: the activation runs once over every expert's rows (per expert it is many small calls)
    h = torch.cat([linear(p, experts.gate_up_proj[e], None if b13 is None else b13[e], routes13[e])
                   for e, p in zip(used, parts)])
    parts = gated_activation_ref(h, activation).split([counts[e] for e in used])
    out = torch.cat([linear(p, experts.down_proj[e], None if b2 is None else b2[e], routes2[e])
                     for e, p in zip(used, parts)])
    out *= weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, out)


def take_expert_tokens(model: object) -> list[list[int]]:
    """Per sparse layer (in order), the tokens routed to each expert since the last call; resets."""
    assert isinstance(model, nn.Module)
    out = []
    for module in model.modules():
        if isinstance(module, SparseMoE):
            out.append(module.expert_tokens.tolist())
            module.expert_tokens.zero_()
    return out


def load_imbalance(counts: list[int]) -> float | None:
    """max over mean tokens per expert (1.0: perfectly even); None when no token was routed."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else None


def map_expert_name(name: str) -> tuple[str, object] | None:
    """A checkpoint's per-expert (or fused) expert tensor -> (our parameter, shard id); None for
    any other tensor. Mixtral's ``block_sparse_moe`` is our ``mlp``."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if ".mlp.experts." not in name:
        return None
    head, _, tail = name.partition(".mlp.experts.")
    if tail in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):  # fused on disk
        return f"{head}.mlp.experts.{tail}", None
    index, _, part = tail.partition(".")
    if not index.isdigit():
        return None
    fused, shard = _EXPERT_PARTS.get(part, (None, None))
    if fused is None:
        return None
    return f"{head}.mlp.experts.{fused}", (int(index), shard)


_EXPERT_PARTS = {
    "gate_proj.weight": ("gate_up_proj", "gate"), "up_proj.weight": ("gate_up_proj", "up"),
    "down_proj.weight": ("down_proj", "down"),
    "w1.weight": ("gate_up_proj", "gate"), "w3.weight": ("gate_up_proj", "up"), "w2.weight": ("down_proj", "down"),
}
