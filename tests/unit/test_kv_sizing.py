"""KV cache sizing: the GPU budget arithmetic, the profile step's shape, and that a profile step
leaves the engine exactly as it was (it runs on a CPU too; only the peak needs CUDA)."""

from __future__ import annotations

import pytest

from tandem import SamplingParams
from tandem.runner.kv_sizing import PROFILE_PREFIX, gpu_kv_budget, profile_batch

GiB = 2**30


def test_gpu_budget_is_the_share_left_after_weights_activations_and_graphs():
    assert gpu_kv_budget(140 * GiB, 0.9, 17 * GiB, 3 * GiB, reserve=GiB) == int(140 * GiB * 0.9) - 21 * GiB


def test_gpu_budget_that_leaves_nothing_says_what_to_change():
    with pytest.raises(ValueError, match="raise gpu_memory_utilization or lower max_num_batched_tokens"):
        gpu_kv_budget(80 * GiB, 0.5, 30 * GiB, 10 * GiB)


@pytest.mark.parametrize("tokens,seqs,block_size", [(2048, 256, 16), (100, 7, 16), (5, 256, 16), (33, 1, 8)])
def test_profile_batch_spreads_the_token_budget_over_the_widest_batch(tokens, seqs, block_size):
    step, blocks = profile_batch(tokens, seqs, block_size)
    assert step.num_batched_tokens == tokens
    assert len(step.chunks) == min(seqs, tokens) == len(step.new_requests)
    assert all(c.sample and c.start_pos == 0 and len(c.block_ids) * block_size >= len(c.token_ids)
               for c in step.chunks)
    used = [b for c in step.chunks for b in c.block_ids]
    assert sorted(used) == list(range(blocks))  # distinct blocks 0..blocks-1


def test_a_profile_step_leaves_cache_states_and_outputs_as_they_were(make_llm):
    llm = make_llm("llama3-gqa")
    runner = llm.llm_engine.runner
    prompts = [{"prompt_token_ids": [(i * 13 + j) % 400 + 3 for j in range(n)]} for i, n in enumerate((4, 21))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    caches = [(a.k_cache, a.v_cache) for a in runner.model.attention_layers()]
    snapshot = caches[0][0].clone()
    assert runner.profile_run(64, 5) == 0  # no CUDA: nothing measured
    assert not [rid for rid in runner.states if rid.startswith(PROFILE_PREFIX)]
    assert all(a.k_cache is k and a.v_cache is v for a, (k, v) in zip(runner.model.attention_layers(), caches))
    assert caches[0][0].equal(snapshot)  # the profile wrote only its own temporary blocks
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == before
