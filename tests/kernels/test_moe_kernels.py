"""Mixture-of-Experts kernels: routing as transformers does it, the torch reference against a plain
per-token loop, and the Triton grouped GEMMs against the reference under the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import moe, moe_triton


def _per_token(x, w13, w2, weights, ids):
    """The definition: each token, each of its experts, one after another."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += weights[t, j].to(x.dtype) * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def _case(t: int, e: int, k: int, h: int, i: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.1).to(dtype)
    weights, ids = moe.softmax_topk(torch.randn(t, e, generator=g), k, renormalize=True)
    return x, w13, w2, weights, ids


def test_routing_is_softmax_then_top_k_optionally_renormalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = moe.softmax_topk(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = moe.softmax_topk(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


@pytest.mark.parametrize("shape", [(1, 4, 2, 16, 8), (9, 8, 2, 32, 24), (33, 6, 3, 24, 16)])
def test_reference_equals_the_per_token_definition(shape):
    args = _case(*shape)
    torch.testing.assert_close(moe.fused_moe_ref(*args), _per_token(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 2, 16, 8), (9, 8, 2, 32, 24), (33, 6, 3, 24, 16), (3, 64, 8, 32, 16)])
def test_grouped_mm_path_equals_the_reference(shape, dtype):
    args = _case(*shape, dtype=dtype)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}  # bf16 sums in another order
    torch.testing.assert_close(moe.fused_moe_grouped(*args), moe.fused_moe_ref(*args), **tol)


def test_alignment_puts_every_assignment_once_in_its_experts_blocks():
    ids = torch.tensor([[3, 0], [0, 3], [1, 0], [3, 1], [0, 2]])
    block = 4
    rows, experts = moe_triton.align_by_expert(ids, 5, block)
    n = ids.numel()
    real = rows[rows < n]
    assert sorted(real.tolist()) == list(range(n))
    for b, e in enumerate(experts.tolist()):
        block_rows = [r for r in rows[b * block:(b + 1) * block].tolist() if r < n]
        if e < 0:
            assert not block_rows
        assert all(int(ids.view(-1)[r]) == e for r in block_rows)
    assert (experts >= 0).sum() == sum((c + block - 1) // block for c in torch.bincount(ids.view(-1)).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (tokens, experts, top-k, hidden, expert intermediate): odd sizes, top-k 1, 2, 3 and 8, and few
# tokens over many experts (most experts empty)
@pytest.mark.parametrize("shape", [(1, 4, 2, 32, 16), (7, 8, 2, 48, 24), (70, 6, 3, 40, 20), (5, 3, 1, 33, 17),
                                   (4, 8, 8, 32, 16), (3, 64, 2, 32, 16)])
def test_triton_fused_moe_matches_the_reference(shape, dtype):
    x, w13, w2, weights, ids = _case(*shape, dtype=dtype)
    want = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    got = moe_triton.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the intermediate is rounded to bf16
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_grouped_sigmoid_routing_equals_transformers_glm4_moe_router(groups):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    n_group, topk_group = groups
    cfg = Glm4MoeConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                        topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True)
    router = Glm4MoeTopkRouter(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.2)
    x = torch.randn(50, 32, generator=g)
    _, want_w, want_ids = router(x)
    weights, ids = moe.grouped_sigmoid_topk(x @ router.weight.T, 4, router.e_score_correction_bias, n_group,
                                            topk_group, True, 2.5)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)  # both unsorted top-k: compare as sets
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order))


def _gpt_oss_experts(e: int, h: int, i: int, seed: int = 0):
    """transformers' GptOssExperts with random weights and biases (gate/up interleaved, transposed)
    and the same weights in tandem's layout: [E, 2I, H] gate rows then up rows, [E, H, I]."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gu, gu_b = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
    w13 = torch.cat([gu[..., 0::2], gu[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
    b13 = torch.cat([gu_b[..., 0::2], gu_b[..., 1::2]], dim=-1)
    return experts, w13, experts.down_proj.detach().transpose(1, 2).contiguous(), b13, experts.down_proj_bias.detach()


GPT_OSS_ACT = moe.GatedActivation("swigluoai", alpha=1.702, limit=7.0)


def test_gpt_oss_routing_and_experts_equal_transformers():
    """Softmax over the top-k logits only; biased GEMMs around the clamped SwiGLU (big inputs, so the
    clamps bite)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    router = GptOssTopKRouter(GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 32, generator=g))
        router.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(21, 32, generator=g) * 4
    _, want_w, want_ids = router(x)
    weights, ids = moe.topk_softmax(F.linear(x, router.weight, router.bias), 3)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)
    experts, w13, w2, b13, b2 = _gpt_oss_experts(8, 32, 16)
    want = experts(x, want_ids, want_w).detach()
    got = moe.fused_moe_ref(x, w13, w2, weights, ids, b13, b2, GPT_OSS_ACT)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(moe.fused_moe_grouped(x, w13, w2, weights, ids, b13, b2, GPT_OSS_ACT), got,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 2, 32, 16), (9, 8, 3, 48, 24), (3, 64, 2, 32, 16)])
def test_triton_fused_moe_with_biases_and_clamped_swiglu_matches_the_reference(shape, dtype):
    t, e, k, h, i = shape
    x, w13, w2, weights, ids = _case(*shape, dtype=dtype)
    x = x * 20  # past the clamp limit
    g = torch.Generator().manual_seed(5)
    b13, b2 = torch.randn(e, 2 * i, generator=g).to(dtype), torch.randn(e, h, generator=g).to(dtype)
    want = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, b13.float(), b2.float(), GPT_OSS_ACT)
    got = moe_triton.fused_moe(x, w13, w2, weights, ids, b13, b2, GPT_OSS_ACT)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_routing_equals_transformers_deepseek_v2_router(method):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                           topk_method=method, routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g) * 0.3)
    x = torch.randn(50, 32, generator=g)
    _, want_w, want_ids = router(x)
    groups = (4, 2) if method == "group_limited_greedy" else (1, 1)
    weights, ids = moe.softmax_topk(x @ router.weight.T, 3, False, *groups)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)  # unsorted top-k: compare as sets
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order) * 1.5, want_w.gather(1, want_order))
