"""Engine behaviour at the offline API: sampling, seeds, n > 1, stops, logprobs, errors, aborts."""

from __future__ import annotations

import math

import pytest
import torch

from tandem import SamplingParams
from tandem.sampling_params import ParamError
from tests.helpers import hf_greedy, hf_model, prompts_for

EOS = 1


def ids(p):
    return {"prompt_token_ids": p}


@pytest.fixture
def llm(make_llm):
    return make_llm("llama3-gqa")


@pytest.fixture
def prompts(llm):
    return prompts_for(llm.llm_engine.vocab_size, [9, 23, 40], seed=1)


def test_seeded_sampling_is_reproducible_across_batch_compositions(llm, prompts):
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(ids(prompts[0]), target, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.3, max_tokens=7, ignore_eos=True)
    batch = llm.generate([ids(prompts[2]), ids(prompts[1]), ids(prompts[0])], [noise, noise, target],
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = llm.generate(ids(prompts[0]), SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                              ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.outputs[0].token_ids != alone


def test_n_samples_share_the_prompt_blocks(llm, prompts):
    prompt = prompts[2]  # 40 tokens: two full blocks of 16
    out = llm.generate(ids(prompt), SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seed + index per child
    assert llm.llm_engine.kv.stats.hits == 2 * 32  # the two later children hit both full blocks


def test_stop_string_is_cut_from_the_text(llm, prompts):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate(ids(prompts[1]), greedy, use_tqdm=False)[0].outputs[0]
    stop = full.text[5:8]
    assert stop
    out = llm.generate(ids(prompts[1]), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    kept = llm.generate(ids(prompts[1]), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                        include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_length(llm, prompts):
    full = llm.generate(ids(prompts[0]), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_tok = full.token_ids[4]
    out = llm.generate(ids(prompts[0]), SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_eos_min_tokens_ignore_eos_and_logit_bias(llm, prompts):
    force_eos = {EOS: 100.0}
    out = llm.generate(ids(prompts[0]), SamplingParams(temperature=0, max_tokens=10, logit_bias=force_eos),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate(ids(prompts[0]), SamplingParams(temperature=0, max_tokens=10, logit_bias=force_eos,
                                                       min_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and EOS not in out.token_ids[:4] and out.token_ids[4] == EOS
    out = llm.generate(ids(prompts[0]), SamplingParams(temperature=0, max_tokens=6, logit_bias=force_eos,
                                                       ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] * 6 and out.finish_reason == "length"


def test_repetition_penalty_matches_transformers(llm, prompts, model_dirs):
    out = llm.generate(ids(prompts[1]), SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5),
                       use_tqdm=False)[0].outputs[0]
    model = hf_model(str(model_dirs["llama3-gqa"]))
    ref = model.generate(torch.tensor([prompts[1]]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                         pad_token_id=2, eos_token_id=EOS)[0, len(prompts[1]):].tolist()
    assert out.token_ids == ref[: ref.index(EOS) + 1] if EOS in ref else ref


def test_top_k_1_and_tiny_top_p_equal_greedy(llm, prompts, model_dirs):
    ref = hf_greedy(str(model_dirs["llama3-gqa"]), prompts[1], 10)
    for params in (SamplingParams(temperature=0.8, top_k=1, max_tokens=10, seed=3),
                   SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=10, seed=3)):
        assert llm.generate(ids(prompts[1]), params, use_tqdm=False)[0].outputs[0].token_ids == ref


def _hf_logprobs(model_dirs, tokens):
    model = hf_model(str(model_dirs["llama3-gqa"]))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def test_logprobs_match_transformers(llm, prompts, model_dirs):
    prompt = prompts[0]
    out = llm.generate(ids(prompt), SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = _hf_logprobs(model_dirs, prompt + out.token_ids)
    assert len(out.logprobs) == 6
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        top = row.topk(3)
        assert list(entry) == top.indices.tolist()
        for tid, lp in entry.items():
            assert math.isclose(lp.logprob, row[tid].item(), abs_tol=1e-4)
            assert lp.decoded_token is not None
    assert math.isclose(out.cumulative_logprob, sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_prompt_logprobs_match_transformers(make_llm, prompts, model_dirs):
    llm = make_llm("llama3-gqa", max_num_batched_tokens=8)  # prompt logprobs across prefill chunks
    prompt = prompts[1]
    out = llm.generate(ids(prompt), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    ref = _hf_logprobs(model_dirs, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry
        assert math.isclose(entry[prompt[pos]].logprob, ref[pos - 1, prompt[pos]].item(), abs_tol=1e-4)
        assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(logit_bias={5: 200}), "logit_bias"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(llm, prompts):
    vocab = llm.llm_engine.vocab_size
    bad = [ids([]), ids([vocab]), ids([-1]), ids(list(range(3, 3 + llm.llm_engine.max_model_len))), 42,
           ids(["a"])]
    for prompt in bad:
        with pytest.raises(ParamError) as e:
            llm.generate([ids(prompts[0]), prompt], SamplingParams(max_tokens=2), use_tqdm=False)
        assert e.value.param == "prompt"
    with pytest.raises(ParamError) as e:
        llm.generate(ids(prompts[0]), SamplingParams(logit_bias={vocab + 5: 1.0}), use_tqdm=False)
    assert e.value.param == "logit_bias"
    assert not llm.llm_engine.has_unfinished_requests()  # nothing half-queued
    out = llm.generate(ids(prompts[0]), SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_abort_in_every_state_frees_everything(make_llm, prompts):
    llm = make_llm("llama3-gqa", max_num_batched_tokens=16, max_num_seqs=2)
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", ids(p), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()  # r0 prefilled and r1 mid-prefill; r2 waiting
    engine.step()
    outs = engine.abort_request(["r0", "r1", "r2", "missing"])
    assert {o.request_id for o in outs} == {"r0", "r1", "r2"}
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.step() == []


def test_max_tokens_defaults_to_the_context_left(make_llm):
    llm = make_llm("llama3-gqa", max_model_len=24)
    out = llm.generate(ids([5] * 20), SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_kv_events_report_stored_blocks(llm, prompts):
    llm.llm_engine.take_kv_events()
    llm.generate(ids(prompts[2]), SamplingParams(max_tokens=1), use_tqdm=False)
    events = llm.llm_engine.take_kv_events()
    stored = [e for e in events if type(e).__name__ == "BlockStored"]
    assert len(stored) == 2 and stored[0].token_ids == prompts[2][:16]
    assert stored[1].parent_block_hash == stored[0].block_hashes[0]


def test_request_phases_follow_the_schedule(make_llm):
    """RequestOutput.metrics carries the core's queue / prefill / decode times: with one running
    sequence at a time, the second request queues for at least the whole first one."""
    llm = make_llm("llama3-gqa", max_num_seqs=1)
    prompts = prompts_for(llm.llm_engine.vocab_size, [12, 12], seed=5)
    first, second = llm.generate([ids(p) for p in prompts], SamplingParams(max_tokens=5, ignore_eos=True),
                                 use_tqdm=False)
    for out in (first, second):
        assert all(out.metrics[k] >= 0 for k in ("queue_time", "prefill_time", "decode_time"))
        assert out.metrics["decode_time"] > 0
    assert second.metrics["queue_time"] >= first.metrics["prefill_time"] + first.metrics["decode_time"]
