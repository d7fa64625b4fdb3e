"""Mixture-of-Experts: routing and the expert MLPs, as torch references (CPU, and the parity
baseline of the Triton kernels in ``moe_triton.py``).

Layout (as vLLM and transformers 5 keep experts in memory): ``w13`` [E, 2I, H] holds each expert's
gate rows then its up rows, ``w2`` [E, H, I] its down projection. Routing gives each token ``top_k``
(expert id, weight) pairs; a token's output is the sum over its pairs of
``weight * w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``. gpt-oss adds a bias to each GEMM (``w13_bias``
[E, 2I], ``w2_bias`` [E, H], before the routing weight) and has its own gated activation
(``GatedActivation``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.activation import SILU, GatedActivation, gated_activation_ref


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, num_groups: int = 1,
                 topk_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over every expert (in fp32), the top ``top_k`` by probability, optionally
    renormalised to sum to 1 (Mixtral always; Qwen3-MoE when ``norm_topk_prob``). With groups
    (DeepSeek-V2's ``group_limited_greedy``): only within the ``topk_groups`` of ``num_groups``
    equal groups whose best expert is highest. Returns (weights fp32 [T, k], expert ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    if num_groups > 1:
        t, e = probs.shape
        best = torch.topk(probs.view(t, num_groups, e // num_groups).amax(dim=-1), topk_groups, dim=-1)[1]
        keep = torch.zeros(t, num_groups, dtype=torch.bool, device=probs.device).scatter_(1, best, True)
        probs = probs.masked_fill(~keep.repeat_interleave(e // num_groups, dim=1), 0.0)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: the top ``top_k`` logits, then a softmax over those only (in fp32)."""
    logits, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(logits.float(), dim=-1), ids


def grouped_sigmoid_topk(router_logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor, num_groups: int,
                         topk_groups: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM-4-MoE routing, in fp32: sigmoid scores; experts are *chosen* on scores plus
    the correction bias, only within the ``topk_groups`` groups (of ``num_groups`` equal groups)
    whose two best biased scores sum highest; the weights are the chosen experts' unbiased scores,
    optionally renormalised to sum to 1, times ``scaling``. Returns (weights fp32, ids int64)."""
    scores = torch.sigmoid(router_logits.float())
    biased = scores + correction_bias.float()
    t, e = biased.shape
    groups = biased.view(t, num_groups, e // num_groups)
    group_scores = groups.topk(min(2, e // num_groups), dim=-1)[0].sum(dim=-1)
    best_groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0).bool()
    biased = biased.masked_fill(~keep.unsqueeze(-1).expand_as(groups).reshape(t, e), float("-inf"))
    ids = torch.topk(biased, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                  activation: GatedActivation = SILU) -> torch.Tensor:
    """[T, H] -> [T, H]: each expert's MLP over the tokens routed to it, weighted and summed in
    the activation dtype (as transformers does), experts in ascending order."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        start += count
        tokens = rows // topk_ids.shape[1]
        h = F.linear(x[tokens], w13[expert], None if w13_bias is None else w13_bias[expert])
        h = gated_activation_ref(h, activation)
        y = F.linear(h, w2[expert], None if w2_bias is None else w2_bias[expert])
        out.index_add_(0, tokens, y * topk_weights.reshape(-1)[rows, None].to(x.dtype))
    return out


def fused_moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, w13_bias: torch.Tensor | None = None,
                      w2_bias: torch.Tensor | None = None, activation: GatedActivation = SILU) -> torch.Tensor:
    """The same as ``fused_moe_ref`` with both GEMMs as one ``torch._grouped_mm`` each over the
    assignments sorted by expert (no Python loop over experts; runs on a CPU too)."""
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    offsets = torch.cumsum(torch.bincount(flat_ids, minlength=w13.shape[0]), 0).to(torch.int32)
    tokens = order // top_k
    row_experts = flat_ids[order]
    h = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=offsets)
    if w13_bias is not None:
        h = h + w13_bias[row_experts]
    h = gated_activation_ref(h, activation)
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)
    if w2_bias is not None:
        y = y + w2_bias[row_experts]
    y = y * topk_weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, w13_bias: torch.Tensor | None = None,
                    w2_bias: torch.Tensor | None = None, activation: GatedActivation = SILU) -> torch.Tensor:
    """The torch path the model runs: ``torch._grouped_mm`` on a CPU (1.35-1.4x the per-expert loop
    at 8-256 tokens on the qwen3-moe-small layer, benchmarks/results/moe-cpu-paths-*.json), the
    per-expert loop elsewhere (CUDA's grouped GEMM wants Hopper and 16-bit types; GPUs run Triton)."""
    fn = fused_moe_grouped if x.device.type == "cpu" else fused_moe_ref
    return fn(x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation)
