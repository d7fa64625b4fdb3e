"""Asynchronous scheduling: step N+1 is scheduled and launched before step N's sampled ids are
read, with PLACEHOLDER_TOKEN where a chunk needs them. Outputs must be exactly those of the
synchronous loop, through stops, lengths, preemption, penalties, logprobs, n > 1 and aborts."""

from __future__ import annotations

import pytest

from tandem import SamplingParams
from tandem.scheduler_output import PLACEHOLDER_TOKEN
from tests.helpers import make_req, make_sched, prompts_for


# -- the scheduler alone: a fake model whose token depends only on (request, position) ---------------
def _token(rid: str, pos: int) -> int:
    return (sum(map(ord, rid)) * 31 + pos * 7) % 40 + 10


def _run(s, async_mode: bool, max_steps: int = 2000) -> dict[str, list[int]]:
    reqs = dict(s.requests)
    in_flight = None
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        for c in out.chunks:
            assert PLACEHOLDER_TOKEN not in c.token_ids[:-1]  # only the newest token can be unknown
            assert (c.token_ids[-1] == PLACEHOLDER_TOKEN) <= async_mode
        sampled = {c.request_id: _token(c.request_id, c.start_pos + len(c.token_ids))
                   for c in out.chunks if c.sample}
        if async_mode:
            previous, in_flight = in_flight, (out, sampled)
            if previous is not None:
                s.update_from_output(*previous)
        else:
            s.update_from_output(out, sampled)
        s.kv.pool.check_invariants()
    else:
        raise AssertionError("did not finish")
    s.kv.pool.assert_idle()
    return {rid: r.output_token_ids for rid, r in reqs.items()}


def _stopping_req(rid, n_prompt, max_tokens, stop_at=None, **kw):
    req = make_req(rid, n_prompt, max_tokens=max_tokens, **kw)
    if stop_at is not None:  # the token this request samples at that position stops it
        req.sampling_params.stop_token_ids = [_token(rid, n_prompt + stop_at)]
    return req


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12: preemption (some with a token in flight)
def test_async_scheduler_ends_every_request_with_the_sync_outputs(num_blocks):
    def fill(s):
        for i, (n, m, stop) in enumerate([(5, 9, None), (17, 4, 2), (3, 1, None), (30, 12, 6), (9, 7, 0),
                                          (12, 20, None)]):
            s.add_request(_stopping_req(f"r{i}", n, m, stop, arrival=i))
    results = []
    for async_mode in (False, True):
        s = make_sched(num_blocks=num_blocks, block_size=4, budget=16, max_seqs=4)
        fill(s)
        results.append(_run(s, async_mode))
        assert (s.num_preemptions > 0) == (num_blocks == 12)
    assert results[0] == results[1]
    assert len(results[0]["r1"]) == 3 and len(results[0]["r4"]) == 1 and len(results[0]["r2"]) == 1


def test_a_request_at_its_length_limit_gets_no_step_for_a_dropped_token():
    s = make_sched()
    s.add_request(make_req("a", 6, max_tokens=2))
    first = s.schedule()  # the prefill samples token 1
    second = s.schedule()  # token 2 decodes from the placeholder
    assert second.chunks[0].token_ids == [PLACEHOLDER_TOKEN]
    assert s.schedule().chunks == []  # token 2 in flight is the last: nothing more to compute
    s.update_from_output(first, {"a": 5})
    s.update_from_output(second, {"a": 6})
    assert not s.has_unfinished_requests()
    s.kv.pool.assert_idle()


# -- the engine ---------------------------------------------------------------------------------------
def _generate(llm, prompts, params):
    return [[(o.token_ids, o.finish_reason, o.text) for o in r.outputs]
            for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


@pytest.mark.parametrize("engine_kw", [dict(max_num_batched_tokens=16),  # chunked prefill, mixed steps
                                       dict(num_gpu_blocks_override=6, max_num_batched_tokens=64)])  # preemption
def test_async_engine_equals_sync_engine(make_llm, engine_kw):
    sync = make_llm("llama3-gqa", **engine_kw)
    prompts = prompts_for(sync.llm_engine.vocab_size, [1, 9, 23, 40, 17], seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={7: 3.0}),  # no history
              SamplingParams(temperature=0.0, max_tokens=1),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=10, n=2),  # seeded: batch-independent
              SamplingParams(temperature=0.0, max_tokens=9, repetition_penalty=1.5, min_tokens=4),  # waits for ids
              SamplingParams(temperature=0.0, max_tokens=7, logprobs=2, stop_token_ids=[0])]
    expected = _generate(sync, prompts, params)
    asyn = make_llm("llama3-gqa", async_scheduling=True, **engine_kw)
    assert _generate(asyn, prompts, params) == expected
    if "num_gpu_blocks_override" in engine_kw:
        assert asyn.llm_engine.scheduler.num_preemptions > 0


def test_long_outputs_through_preemption_lose_no_late_token(make_llm):
    """A preempted request's in-flight token reaches the output stream (its whole length), not
    only its internal token list."""
    kw = dict(num_gpu_blocks_override=6, block_size=16, max_num_batched_tokens=64)
    sync = make_llm("llama3-gqa", **kw)
    prompts = prompts_for(sync.llm_engine.vocab_size, [10, 12, 14], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = _generate(sync, prompts, params)
    asyn = make_llm("llama3-gqa", async_scheduling=True, **kw)
    assert _generate(asyn, prompts, params) == expected
    assert asyn.llm_engine.scheduler.num_preemptions > 0
    assert [len(r[0][0]) for r in expected] == [40, 40, 40]


def test_n_siblings_hit_the_prompt_their_first_child_computed(make_llm):
    results = []
    for async_mode in (False, True):
        llm = make_llm("llama3-gqa", async_scheduling=async_mode, block_size=16)
        prompt = prompts_for(llm.llm_engine.vocab_size, [40], seed=3)[0]
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(temperature=0.0, max_tokens=4, n=2, ignore_eos=True), use_tqdm=False)[0]
        results.append(([o.token_ids for o in out.outputs], out.num_cached_tokens))
    assert results[0] == results[1]
    assert results[1][1] == 32  # the sibling found both full blocks of the prompt cached


def test_a_reused_request_id_never_receives_the_old_requests_token(make_llm):
    """Abort x while a step holding x is in flight, add a new x at once: the old step's token is
    not applied to the new request."""
    outputs = []
    for async_mode in (False, True):
        engine = make_llm("llama3-gqa", async_scheduling=async_mode).llm_engine
        first, second = prompts_for(engine.vocab_size, [9, 9], seed=5)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        engine.add_request("x", {"prompt_token_ids": first}, params)
        engine.add_request("y", {"prompt_token_ids": first}, SamplingParams(temperature=0.0, max_tokens=20,
                                                                            ignore_eos=True))
        for _ in range(3):
            engine.step()
        engine.abort_request("x")
        engine.add_request("x", {"prompt_token_ids": second}, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        outputs.append(done)
    assert outputs[0] == outputs[1]


def test_stop_tokens_found_one_step_late_still_end_the_output_there(make_llm):
    sync = make_llm("llama3-gqa")
    prompts = prompts_for(sync.llm_engine.vocab_size, [7, 15], seed=2)
    free = _generate(sync, prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    stop = [free[0][0][0][3], free[1][0][0][0]]  # the 4th and the 1st greedy token
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[t]) for t in stop]
    asyn = make_llm("llama3-gqa", async_scheduling=True)
    got = _generate(asyn, prompts, params)
    assert got == _generate(sync, prompts, params)
    assert [len(r[0][0]) for r in got] == [free[0][0][0].index(stop[0]) + 1, 1]


def test_aborts_with_a_step_in_flight_free_everything(make_llm):
    llm = make_llm("llama3-gqa", async_scheduling=True, max_num_batched_tokens=16)
    engine = llm.llm_engine
    prompts = prompts_for(engine.vocab_size, [5, 30, 8], seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(4):
        engine.step()
    outs = engine.abort_request(["r0", "r1", "r2"])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.step() == []  # make_llm then asserts every block free and nothing in flight


def test_async_scheduling_refuses_disaggregation(model_dirs):
    from tandem.config import KVTransferConfig
    from tandem.engine.arg_utils import EngineArgs
    from tandem.engine.core import EngineCore

    config = EngineArgs(str(model_dirs["llama3-gqa"]), async_scheduling=True).create_engine_config()
    config.kv_transfer = KVTransferConfig(role="decode", secret=b"s" * 32)
    with pytest.raises(ValueError, match="async scheduling does not combine"):
        EngineCore(config)


def test_serve_refuses_async_scheduling_with_a_role_before_loading(model_dirs, monkeypatch, capsys):
    from tandem.cli import main

    monkeypatch.setenv("TANDEM_KV_TRANSFER_SECRET", "0123456789abcdef0123")
    assert main(["serve", str(model_dirs["llama3-gqa"]), "--role", "decode", "--async-scheduling"]) == 2
    assert "--async-scheduling does not combine" in capsys.readouterr().err
