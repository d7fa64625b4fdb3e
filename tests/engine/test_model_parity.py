"""tandem vs Hugging Face transformers on tiny random models: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tandem import SamplingParams
from tests.helpers import ALL_PRESETS, hf_greedy, hf_model, prompts_for


def tandem_prefill_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one paged prefill through the runner."""
    return llm.llm_engine.core.score_logits(prompt)


@pytest.mark.parametrize("cpu_gemm", ["blas", "onednn"])
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_forward_logits_match_transformers(preset, cpu_gemm, make_llm, model_dirs):
    llm = make_llm(preset, cpu_gemm=cpu_gemm)
    path = str(model_dirs[preset])
    prompt = prompts_for(llm.llm_engine.vocab_size, [37])[0]
    ours = tandem_prefill_logits(llm, prompt)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_greedy_batch_matches_transformers_generate(preset, make_llm, model_dirs):
    llm = make_llm(preset)
    path = str(model_dirs[preset])
    prompts = prompts_for(llm.llm_engine.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, p, 24), f"prompt of {len(p)} tokens"


ENGINE_VARIANTS = {
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "prefix-cache": dict(enable_prefix_caching=True),
    "tiny-budget-chunked-prefill": dict(max_num_batched_tokens=7),
    "forced-preemption": dict(num_gpu_blocks_override=32, block_size=4),
    "max-seqs-2": dict(max_num_seqs=2, block_size=8),
    "cpu-gemm-blas": dict(cpu_gemm="blas"),  # every fp32 linear through torch's BLAS
    "cpu-gemm-onednn": dict(cpu_gemm="onednn"),  # every fp32 linear through oneDNN, weights packed at load
}


@pytest.mark.parametrize("variant", sorted(ENGINE_VARIANTS))
def test_greedy_matches_transformers_under_engine_variants(variant, make_llm, model_dirs):
    preset = "llama3-gqa"
    llm = make_llm(preset, **ENGINE_VARIANTS[variant])
    path = str(model_dirs[preset])
    base = prompts_for(llm.llm_engine.vocab_size)
    # shared prefixes so that the prefix cache has something to hit, the second round fully warm
    prompts = base + [base[4][:33] + p for p in base[:3]]
    params = SamplingParams(temperature=0, max_tokens=20)
    refs = [hf_greedy(path, p, 20) for p in prompts]
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == refs
    engine = llm.llm_engine
    if variant == "forced-preemption":
        assert engine.scheduler.num_preemptions > 0
    if variant == "prefix-cache":
        assert engine.kv.stats.hits > 0
        assert outs[-1].num_cached_tokens >= 32


def test_text_prompts_and_chat(make_llm):
    llm = make_llm("qwen2-tied")
    tok = llm.get_tokenizer()
    out = llm.generate("def fib(n):", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode("def fib(n):")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4),
                    use_tqdm=False)[0]
    assert chat.prompt_token_ids[0] == tok.bos_token_id and len(chat.outputs[0].token_ids) >= 1


@pytest.mark.parametrize("variant", ["tiny-budget-chunked-prefill", "prefix-cache", "forced-preemption"])
def test_sliding_window_matches_transformers_under_engine_variants(variant, make_llm, model_dirs):
    """Mistral with a 7-token window: chunks and cached prefixes longer than the window stay exact."""
    preset = "mistral-swa"
    llm = make_llm(preset, **ENGINE_VARIANTS[variant])
    path = str(model_dirs[preset])
    base = prompts_for(llm.llm_engine.vocab_size)
    prompts = base + [base[4][:33] + p for p in base[:3]]
    params = SamplingParams(temperature=0, max_tokens=20)
    refs = [hf_greedy(path, p, 20) for p in prompts]
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.parametrize("rows", [1, 7, 8, 12, 48, 49, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dispatch_matches_f_linear(rows, with_bias):
    """tandem's linear picks a different BLAS call for a few fp32 rows; the result must not change."""
    import torch.nn.functional as F

    from tandem.model.layers import linear

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(160, 96, generator=g)
    b = torch.randn(160, generator=g) if with_bias else None
    out = linear(x, w, b)
    assert out.is_contiguous() and out.shape == (rows, 160)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
