"""Scheduler budgets, chunked prefill, preemption and priority: plain data, a fake model step."""

import random

import pytest

from tandem.engine.request import RequestStatus
from tandem.engine.scheduler import Scheduler
from tests.helpers import make_req, make_sched


def fake_step(s: Scheduler, token=7):
    """Run one step; every sampled chunk gets ``token``. Returns the scheduler output."""
    out = s.schedule()
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(out.chunks) <= s.config.max_num_seqs
    s.update_from_output(out, {c.request_id: token for c in out.chunks if c.sample})
    s.kv.pool.check_invariants()
    return out


def run_to_completion(s: Scheduler, max_steps=1000):
    steps = []
    while s.has_unfinished_requests():
        steps.append(fake_step(s))
        assert len(steps) < max_steps
    s.kv.pool.assert_idle()
    return steps


def test_decode_and_prefill_chunks_share_one_budget():
    s = make_sched(budget=16)
    s.add_request(make_req("a", 6, max_tokens=10, arrival=0))
    fake_step(s)  # a's whole prompt
    s.add_request(make_req("b", 40, arrival=1))
    out = fake_step(s)
    sizes = {c.request_id: len(c.token_ids) for c in out.chunks}
    assert sizes == {"a": 1, "b": 15}  # decode + a prefill chunk filling the rest of the budget
    assert not next(c for c in out.chunks if c.request_id == "b").sample
    run_to_completion(s)


def test_chunked_prefill_samples_only_on_the_last_chunk():
    s = make_sched(budget=8)
    s.add_request(make_req("a", 20, max_tokens=2))
    outs = run_to_completion(s)
    chunks = [c for o in outs for c in o.chunks]
    assert [len(c.token_ids) for c in chunks] == [8, 8, 4, 1]
    assert [c.sample for c in chunks] == [False, False, True, True]
    assert [c.start_pos for c in chunks] == [0, 8, 16, 20]


def test_max_num_seqs_limits_the_batch():
    s = make_sched(max_seqs=2, budget=64)
    for i in range(5):
        s.add_request(make_req(f"r{i}", 3, arrival=i))
    out = fake_step(s)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    run_to_completion(s)


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_by_recompute_when_blocks_run_out(caching):
    s = make_sched(num_blocks=6, block_size=4, budget=64, caching=caching)
    s.add_request(make_req("old", 8, max_tokens=12, arrival=0))
    s.add_request(make_req("new", 8, max_tokens=12, arrival=1, first_token=50))
    preempted = []
    outs = []
    while s.has_unfinished_requests():
        out = fake_step(s)
        outs.append(out)
        preempted += out.preempted_request_ids
        assert len(outs) < 200
    s.kv.pool.assert_idle()
    assert "new" in preempted and "old" not in preempted  # FCFS preempts the latest arrival
    assert s.num_preemptions >= 1
    # the resumed request recomputes its prompt and its outputs so far in one prefill; with
    # prefix caching its own freed full blocks are still cached and are skipped
    first, resumed = [c for o in outs for c in o.chunks if c.request_id == "new" and len(c.token_ids) > 1]
    assert first.start_pos == 0 and resumed.sample
    assert resumed.start_pos + len(resumed.token_ids) > 8
    assert (resumed.start_pos > 0) == caching


def test_priority_policy_admits_and_preempts_by_priority():
    s = make_sched(max_seqs=1, policy="priority")
    s.add_request(make_req("low", 3, priority=5, arrival=0))
    s.add_request(make_req("high", 3, priority=-1, arrival=1))
    out = fake_step(s)
    assert [c.request_id for c in out.chunks] == ["high"]
    run_to_completion(s)


def test_finish_on_length_and_stop_token():
    s = make_sched()
    s.add_request(make_req("len", 3, max_tokens=3))
    req = make_req("eos", 3, max_tokens=10)
    req.sampling_params._eos_token_ids = {7}
    req.sampling_params.ignore_eos = False
    s.add_request(req)
    run_to_completion(s)
    assert req.status == RequestStatus.FINISHED_STOPPED and req.num_output_tokens == 1


def test_abort_frees_blocks_in_every_state():
    s = make_sched(budget=8)
    s.add_request(make_req("waiting", 4, arrival=2))
    s.add_request(make_req("prefilling", 30, arrival=0))
    fake_step(s)
    s.finish_requests(["prefilling", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    out = s.schedule()
    assert out.finished_request_ids == {"prefilling"}  # the runner saw it, so it must drop its state
    s.kv.pool.assert_idle()


def test_siblings_wait_for_the_shared_prompt_then_hit_the_cache():
    s = make_sched(budget=64)
    for i in range(3):
        s.add_request(make_req(f"{i}_p", 13, parent="p", arrival=0))
    out = fake_step(s)
    assert [c.request_id for c in out.chunks] == ["0_p"]
    out = fake_step(s)
    hits = {c.request_id: c.start_pos for c in out.chunks if c.request_id != "0_p"}
    assert hits == {"1_p": 12, "2_p": 12}  # three full blocks of the prompt came from the cache
    run_to_completion(s)


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    s = make_sched(num_blocks=24, block_size=4, budget=24, max_seqs=6)
    for i in range(40):
        s.add_request(make_req(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12), arrival=i,
                               first_token=rng.choice([0, 0, 100])))
        if rng.random() < 0.5:
            fake_step(s)
        if rng.random() < 0.1 and s.running:
            s.finish_requests([rng.choice(s.running).request_id], RequestStatus.FINISHED_ABORTED)
    run_to_completion(s)


def test_a_request_waiting_for_blocks_is_counted_once_in_the_prefix_cache_statistics():
    s = make_sched(num_blocks=6, block_size=4, budget=64, max_seqs=4)
    s.add_request(make_req("big", 20, max_tokens=3))  # 5 of the 6 blocks, then 6 while decoding
    s.add_request(make_req("next", 8, max_tokens=2, first_token=100))  # must wait for big to finish
    for _ in range(3):
        fake_step(s)
    assert s.requests["next"].status == RequestStatus.WAITING  # asked for its prefix every step
    while s.has_unfinished_requests():
        fake_step(s)
    assert s.kv.stats.requests == 2 and s.kv.stats.queries == 20 + 8
