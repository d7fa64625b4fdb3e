"""Speculative decoding (n-gram and a draft model): outputs equal those without speculation, block
accounting stays exact, the planner backs off when drafts cost more than they give."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.config import SchedulerConfig, SpeculativeConfig
from tandem.engine.arg_utils import DEMO_MODEL_DIR, EngineArgs
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request
from tandem.engine.scheduler import Scheduler
from tandem.kernels.sampling import sample_ref, sampling_probs
from tandem.spec_decode.planner import EXPLORE_EVERY, MIN_PAIRS, PROBE_INTERVAL, SpeculationPlanner, StepCostModel
from tandem.spec_decode.rejection import greedy_verify, rejection_sample
from tandem.testing import build_tiny_model


# -- the scheduler alone: a fake model whose next token depends only on (request, position) ------------
def _target(rid: str, pos: int) -> int:
    """The token at ``pos``: a period-7 pattern (n-gram proposals mostly right), broken every 11
    positions (a rejection), different per request."""
    if pos % 11 == 0:
        return 90 + len(rid) % 5
    return (sum(map(ord, rid)) + pos % 7) % 60 + 10


def _spec_sched(num_blocks: int, budget: int, k: int, max_len: int = 256) -> Scheduler:
    kv = KVCacheManager(num_blocks, 4, True)
    spec = SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=3, adaptive=False)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4), kv, max_len, speculative=spec)


def _fake_drafter(out, sampled, emitted) -> dict[str, tuple[int, list[int]]]:
    """What the runner's drafter returns: for each chunk with lookahead, drafts for the positions after
    the step's tokens, right except at every fifth position."""
    proposals = {}
    for c in out.chunks:
        if c.num_lookahead_tokens and c.request_id in sampled:
            kept = len(emitted[c.request_id]) if c.request_id in emitted else len(c.token_ids)
            follows = c.start_pos + kept + 1
            # the drafter writes scratch KV up to the last draft's input position
            assert len(c.block_ids) * 4 >= follows + c.num_lookahead_tokens - 1
            proposals[c.request_id] = (follows, [_target(c.request_id, p) + (p % 5 == 0)
                                                 for p in range(follows, follows + c.num_lookahead_tokens)])
    return proposals


def _run(s: Scheduler, max_steps: int = 3000, drafter=None) -> tuple[dict[str, list[int]], int]:
    reqs = dict(s.requests)
    steps = 0
    while s.has_unfinished_requests():
        steps += 1
        assert steps < max_steps, "did not finish"
        out = s.schedule()
        # drafts take only the budget and blocks left once every running request has its token
        assert not (out.preempted_request_ids and any(c.num_draft_tokens for c in out.chunks))
        sampled, emitted = {}, {}
        for c in out.chunks:
            if not c.sample:
                continue
            end = c.start_pos + len(c.token_ids)
            if not c.num_draft_tokens:
                sampled[c.request_id] = _target(c.request_id, end)
                continue
            first = c.start_pos + 1  # the position the last token's logits predict
            tokens = []
            for j, draft in enumerate(c.token_ids[1:]):
                tokens.append(_target(c.request_id, first + j))
                if draft != tokens[-1]:
                    break
            else:
                tokens.append(_target(c.request_id, end))  # every draft accepted: the bonus token
            sampled[c.request_id], emitted[c.request_id] = tokens[0], tokens
        s.update_from_output(out, sampled, emitted, drafter(out, sampled, emitted) if drafter else None)
        s.kv.pool.check_invariants()
        for req in s.running:  # blocks cover the computed tokens and the next one, never more
            assert len(s.kv.req_blocks[req.request_id]) <= -(-req.num_tokens // s.kv.block_size)
    s.kv.pool.assert_idle()
    return {rid: r.output_token_ids for rid, r in reqs.items()}, steps


def _fill(s: Scheduler) -> None:
    for i, (n, m, stop_at) in enumerate([(9, 30, None), (20, 25, 13), (3, 1, None), (14, 40, None), (30, 12, 5)]):
        rid = f"r{i}"
        params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
        if stop_at is not None:  # the token at that output position stops the request
            params.stop_token_ids = [_target(rid, n + stop_at)]
        s.add_request(Request(rid, [_target(rid, p) for p in range(n)], params, max_tokens=m, arrival_time=i))


@pytest.mark.parametrize("num_blocks,budget", [(64, 64), (64, 6), (14, 16)])  # plain, chunked prefill, preemption
@pytest.mark.parametrize("k", [1, 4])
def test_scheduler_outputs_equal_decoding_without_drafts(num_blocks, budget, k):
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4), KVCacheManager(num_blocks, 4),
                      256)
    _fill(plain)
    want, plain_steps = _run(plain)
    s = _spec_sched(num_blocks, budget, k)
    _fill(s)
    got, spec_steps = _run(s)
    assert got == want
    stats = s.planner.stats
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert spec_steps < plain_steps
    # drafts past a length never count; r1 and r4 end at their stop token
    assert [len(want[r]) for r in ("r0", "r2", "r3")] == [30, 1, 40]
    assert len(want["r1"]) <= 14 and len(want["r4"]) <= 6


@pytest.mark.parametrize("num_blocks,budget", [(64, 64), (64, 6), (14, 16)])  # plain, chunked prefill, preemption
def test_scheduler_with_draft_model_proposals_equals_decoding_without_drafts(num_blocks, budget):
    """Lookahead blocks for the drafter are reserved from what is left and given back after the step
    (``_run`` checks the block invariants after every step); stale proposals are never verified."""
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4), KVCacheManager(num_blocks, 4),
                      256)
    _fill(plain)
    want, plain_steps = _run(plain)
    kv = KVCacheManager(num_blocks, 4, True)
    spec = SpeculativeConfig(method="draft_model", model="unused-by-the-scheduler", num_speculative_tokens=3,
                             adaptive=False)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4), kv, 256, speculative=spec)
    _fill(s)
    got, spec_steps = _run(s, drafter=_fake_drafter)
    assert got == want
    stats = s.planner.stats
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert spec_steps < plain_steps


def test_drafts_never_pass_max_model_len():
    s = _spec_sched(64, 64, 4, max_len=30)
    s.add_request(Request("a", [_target("a", p) for p in range(20)], SamplingParams(max_tokens=50, ignore_eos=True),
                          max_tokens=50))
    out, _ = _run(s)
    assert len(out["a"]) == 10  # 20 + 10 = max_model_len


def test_requests_that_need_every_token_are_not_speculated():
    s = _spec_sched(64, 64, 4)
    for i, extra in enumerate([{"presence_penalty": 0.5}, {"seed": 7, "temperature": 1.0},
                               {"logit_bias": {3: 1.0}}, {"min_tokens": 20}]):
        params = SamplingParams(max_tokens=20, ignore_eos=True, **extra)
        s.add_request(Request(f"x{i}", [_target("x", p) for p in range(12)], params, max_tokens=20))
    _run(s)
    assert s.planner.stats.num_drafts == 0


# -- the planner ---------------------------------------------------------------------------------------
def _planner_with_costs(fixed: float, per_token: float, accepted_of_4: int) -> SpeculationPlanner:
    planner = SpeculationPlanner(4)
    for n in (1, 8, 32, 64, 128, 4, 16, 2, 48, 100):
        planner.cost.observe(n, fixed + per_token * n)
    for _ in range(50):
        planner.record("warm", 4, accepted_of_4)
    planner.forget("warm")
    return planner


def test_cost_model_recovers_a_linear_step_time():
    model = StepCostModel()
    assert model.fit() is None
    for n in range(1, 20):
        model.observe(n, 0.010 + 0.001 * n)
    fixed, per_token = model.fit()
    assert fixed == pytest.approx(0.010) and per_token == pytest.approx(0.001)


def test_planner_drafts_when_steps_cost_little_per_token_and_stops_under_load():
    cheap = _planner_with_costs(fixed=0.020, per_token=0.0002, accepted_of_4=3)
    assert cheap.plan({"a": 4}, base_tokens=1, base_emitted=1) == {"a": 4}
    # 64 decodes, per-token compute dominates: no draft raises the step's tokens per second
    loaded = _planner_with_costs(fixed=0.020, per_token=0.005, accepted_of_4=3)
    assert loaded.plan({f"r{i}": 4 for i in range(64)}, base_tokens=64, base_emitted=64) == {}
    # at the same cost, drafts that are always rejected are dropped, drafts always accepted kept
    assert _planner_with_costs(0.020, 0.002, 0).plan({"a": 4, "b": 4}, 2, 2) == {}
    assert _planner_with_costs(0.020, 0.002, 4).plan({"a": 4, "b": 4}, 2, 2) == {"a": 4, "b": 4}


def test_a_steady_batch_keeps_the_last_fit_and_passed_over_requests_are_probed():
    planner = _planner_with_costs(fixed=0.020, per_token=0.005, accepted_of_4=3)
    fit = planner.cost.fit()
    for _ in range(200):  # the window fills with steps of one size: the slope cannot be refitted
        planner.cost.observe(64, 0.34)
    assert planner.cost.fit() == fit
    avail = {f"r{i}": 4 for i in range(64)}
    plans = [planner.plan(avail, 64, 64) for _ in range(PROBE_INTERVAL)]
    assert all(p == {} for p in plans[:-1]) and plans[-1] == dict.fromkeys(avail, 1)


def test_the_policy_measured_faster_runs_and_the_other_is_retried():
    planner = SpeculationPlanner(4)
    rates = {True: 800.0, False: 1000.0}  # tokens/s of decode steps with and without drafts
    chosen = []
    for _ in range(80):
        speculate = planner.speculate_now(32)
        chosen.append(speculate)
        planner.observe_step(32, speculate, int(rates[speculate] / 100), 0.01)
    # alternate until a few pairs are measured (each switch is a pair: MIN_PAIRS + 1 steps)
    assert chosen[:MIN_PAIRS + 1] == [i % 2 == 0 for i in range(MIN_PAIRS + 1)]
    retries = [i for i, c in enumerate(chosen) if c and i > MIN_PAIRS]
    first = MIN_PAIRS + EXPLORE_EVERY
    assert retries[:2] == [first, first + 2 * EXPLORE_EVERY]  # each confirmed retry: the next one later
    assert not planner.speculation_measured_better(40) and planner.speculation_measured_better(4)
    rates = {True: 1500.0, False: 1000.0}  # the workload changed: drafts now pay
    for _ in range(64):
        speculate = planner.speculate_now(32)
        planner.observe_step(32, speculate, int(rates[speculate] / 100), 0.01)
    assert planner.speculate_now(32) or planner.speculate_now(32)


def test_speculates_next_predicts_the_next_decode_steps_choice():
    planner = SpeculationPlanner(4)
    for step in range(200):
        predicted = planner.speculates_next(3)
        speculated = planner.speculate_now(3)
        assert predicted == speculated
        planner.observe_step(3, speculated, 6 if speculated else 4, 1.0 + (step % 3) * 0.01)


def test_planner_without_measurements_or_not_adaptive_verifies_every_proposal():
    assert SpeculationPlanner(4).plan({"a": 3, "b": 1}, 2, 2) == {"a": 3, "b": 1}
    fixed = _planner_with_costs(0.02, 0.002, 0)
    fixed.adaptive = False
    assert fixed.plan({f"r{i}": 2 for i in range(64)}, 64, 64) == {f"r{i}": 2 for i in range(64)}


# -- the target distribution a draft is verified against ------------------------------------------------
def test_sampling_probs_is_the_distribution_sample_ref_draws_from():
    torch.manual_seed(0)
    vocab, draws = 12, 20000
    logits = torch.randn(1, vocab) * 2
    args = (torch.tensor([0.8]), torch.tensor([6], dtype=torch.int32), torch.tensor([0.9]), torch.tensor([0.02]))
    probs = sampling_probs(logits, *args)[0]
    rows = logits.expand(draws, vocab).contiguous()
    expand = [a.expand(draws).contiguous() for a in args]
    counts = torch.bincount(sample_ref(rows, *expand, torch.rand(draws, vocab)), minlength=vocab).float()
    assert torch.allclose(counts / draws, probs, atol=0.015)
    assert (probs[counts == 0] == 0).all() and probs.sum() == pytest.approx(1.0)


def test_greedy_verify_equals_rejection_sampling_of_greedy_rows():
    torch.manual_seed(3)
    b, k, vocab = 6, 3, 10
    probs = torch.softmax(torch.randn(b, k + 1, vocab), -1)
    argmax = probs.argmax(-1)
    drafts = torch.where(torch.rand(b, k) < 0.7, argmax[:, :k], torch.randint(0, vocab, (b, k)))
    num_draft = torch.tensor([3, 2, 0, 1, 3, 3])
    want = rejection_sample(probs, drafts, None, torch.ones(b, dtype=torch.bool), num_draft=num_draft)
    got = greedy_verify(drafts, num_draft, argmax)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[1] <= num_draft + 1).all()


# -- the engine on a tiny random model --------------------------------------------------------------------
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


def _prompts() -> list[list[int]]:
    return [[5, 6, 7, 8, 9, 10, 11, 12] * 4 + [5, 6], list(range(3, 40)) + list(range(3, 20)), [7] * 20,
            [40, 41, 42] * 10]


def _tokens(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.mark.parametrize("preset", ["llama3-gqa", "qwen3-moe"])
def test_greedy_outputs_equal_without_speculation(make_llm, preset):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = _tokens(make_llm(preset), _prompts(), params)
    spec = make_llm(preset, speculative_config=SPEC)
    assert _tokens(spec, _prompts(), params) == want
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0


def test_greedy_equal_with_chunked_prefill_preemption_and_n(make_llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    kw = {"max_num_batched_tokens": 16, "num_gpu_blocks_override": 14, "block_size": 4, "max_num_seqs": 4}
    want = _tokens(make_llm(**kw), _prompts(), params)
    spec = make_llm(speculative_config=SPEC, **kw)
    assert _tokens(spec, _prompts(), params) == want
    assert spec.llm_engine.scheduler.num_preemptions > 0


def test_sampled_requests_with_speculation_end_normally(make_llm):
    spec = make_llm(speculative_config=SPEC)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, max_tokens=25, ignore_eos=True, n=3)
    out = spec.generate([{"prompt_token_ids": p} for p in _prompts()], params)
    assert all(len(c.token_ids) == 25 for o in out for c in o.outputs)
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0


def _draft_spec(model_dir, **kw) -> dict:
    return {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3, "adaptive": False, **kw}


@pytest.mark.parametrize("draft", ["llama3-gqa", "qwen3-moe"])  # the target itself; another family, random
def test_draft_model_greedy_equal_with_chunked_prefill_preemption_n_and_prefix_hits(make_llm, model_dirs, draft):
    """Twice over the same prompts (the second run hits the prefix cache). With the target as its
    own draft nearly every draft is accepted, prefix hits included: the drafter's KV is valid
    wherever the target's is."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    kw = {"max_num_batched_tokens": 16, "num_gpu_blocks_override": 14, "block_size": 4, "max_num_seqs": 4}
    want = _tokens(make_llm(**kw), _prompts(), params)
    spec = make_llm(speculative_config=_draft_spec(model_dirs[draft]), **kw)
    assert _tokens(spec, _prompts(), params) == want
    stats = spec.llm_engine.scheduler.planner.stats
    first_run = stats.num_accepted_tokens, stats.num_draft_tokens
    outputs = spec.generate([{"prompt_token_ids": p} for p in _prompts()], params)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == want
    assert spec.llm_engine.scheduler.num_preemptions > 0 and spec.llm_engine.kv.stats.hits > 0
    accepted, proposed = stats.num_accepted_tokens - first_run[0], stats.num_draft_tokens - first_run[1]
    assert proposed > 0
    # with a host KV tier as well (restored blocks hold the target's KV only; the drafter computes its own)
    offload = make_llm(speculative_config=_draft_spec(model_dirs[draft]), kv_offloading_size=0.01, **kw)
    assert _tokens(offload, _prompts(), params) == want
    assert _tokens(offload, _prompts(), params) == want
    # each request's own counts (its n completions summed) add up to the engine's
    assert sum(o.metrics["spec_num_draft_tokens"] for o in outputs) == proposed
    assert sum(o.metrics["spec_num_accepted_tokens"] for o in outputs) == accepted
    if draft == "llama3-gqa":
        assert accepted >= 0.9 * proposed


def test_draft_model_sampled_and_adaptive_requests_end_normally(make_llm, model_dirs):
    spec = make_llm(speculative_config=_draft_spec(model_dirs["llama3-gqa"], adaptive=True))
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, max_tokens=25, ignore_eos=True, n=3)
    out = spec.generate([{"prompt_token_ids": p} for p in _prompts()], params)
    assert all(len(c.token_ids) == 25 for o in out for c in o.outputs)
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0
    # requests that need every token decode one at a time beside them, and the drafter keeps up
    mixed = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    outs = [spec.generate([{"prompt_token_ids": _prompts()[0]}], p)[0].outputs[0] for p in mixed]
    assert outs[0].token_ids == outs[1].token_ids


def test_a_failing_draft_model_costs_only_its_proposals(make_llm, model_dirs):
    """The drafter raising after a step: the step's tokens stand (a penalty request beside the
    speculating ones reads each of them once), that step proposes nothing, and the next ones do."""
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, frequency_penalty=p) for p in (0.0, 2.0)]
    plain = make_llm()
    want = [[o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": q} for q in _prompts()], p)]
            for p in params]
    spec = make_llm(speculative_config=_draft_spec(model_dirs["llama3-gqa"]))
    drafter = spec.llm_engine.runner.drafter
    propose, calls = drafter.propose, []

    def fails_on_the_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected drafter failure")
        return propose(*args, **kwargs)

    drafter.propose = fails_on_the_third_call
    prompts = [{"prompt_token_ids": q} for q in _prompts()]
    outputs = spec.generate(prompts + prompts, [params[0]] * len(prompts) + [params[1]] * len(prompts))
    assert [o.outputs[0].token_ids for o in outputs] == want[0] + want[1]
    assert len(calls) > 3 and spec.llm_engine.scheduler.planner.stats.num_accepted_tokens > 0


def test_draft_model_errors_name_the_problem(make_llm, model_dirs, tmp_path):
    with pytest.raises(ValueError, match="'draft_model' needs model"):
        EngineArgs(speculative_config={"method": "draft_model"})
    with pytest.raises(ValueError, match="prompt_lookup_max apply to method 'ngram' only"):
        EngineArgs(speculative_config={"method": "draft_model", "model": "x", "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="model applies to methods 'draft_model', 'eagle' and 'eagle3'"):
        EngineArgs(speculative_config={"method": "ngram", "model": "x"})
    other_vocab = build_tiny_model(tmp_path / "v300", family="llama", vocab_size=300)
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        make_llm(speculative_config=_draft_spec(other_vocab))


def test_speculative_config_errors_name_the_problem(make_llm):
    with pytest.raises(ValueError, match="'mtp' is not supported yet"):
        EngineArgs(speculative_config={"method": "mtp", "model": "x"})
    with pytest.raises(ValueError, match="unsupported key"):
        EngineArgs(speculative_config={"method": "ngram", "num_lookahead": 2})
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        EngineArgs(speculative_config={"num_speculative_tokens": 0})


def test_a_stop_string_inside_accepted_drafts_ends_the_tokens_there():
    """The demo model copying text: steps accept several tokens, and a stop string completed by one
    of them drops the rest (token ids, text and reasons equal an engine without speculation)."""
    text = (DEMO_MODEL_DIR / "heldout-sample.txt").read_text()[:900]
    prompt = text + "\n\n" + text[:200]
    engines = [LLM(model=str(DEMO_MODEL_DIR), kv_cache_memory="16MiB", speculative_config=cfg)
               for cfg in (None, {**SPEC, "prompt_lookup_min": 2})]
    want = engines[0].generate([prompt], SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)[0].outputs[0]
    stops = {want.text[i:i + 4] for i in range(10, len(want.text) - 4, 9)} - {""}
    for stop in sorted(stops):
        params = SamplingParams(temperature=0, max_tokens=80, stop=[stop], logprobs=2)
        plain, spec = (llm.generate([prompt], params, use_tqdm=False)[0].outputs[0] for llm in engines)
        assert (spec.token_ids, spec.text, spec.finish_reason, spec.stop_reason) == (
            plain.token_ids, plain.text, plain.finish_reason, plain.stop_reason)
        # logprobs of every accepted token, from the verifying forward: one per token, as without drafts
        assert len(spec.logprobs) == len(plain.logprobs) == len(plain.token_ids)
        for mine, theirs in zip(spec.logprobs, plain.logprobs):
            assert mine.keys() == theirs.keys()
            for tid, lp in theirs.items():
                assert mine[tid].rank == lp.rank and mine[tid].logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert spec.cumulative_logprob == pytest.approx(plain.cumulative_logprob, abs=1e-3)
    stats = engines[1].llm_engine.scheduler.planner.stats
    assert max(stats.accepted_per_pos[1:]) > 0  # steps that gave three or more tokens
    # a request a stop string ended (in the output processor) still reports its own acceptance
    ended = engines[1].generate([prompt], SamplingParams(temperature=0, max_tokens=80, stop=[sorted(stops)[-1]]),
                                use_tqdm=False)[0]
    assert ended.outputs[0].finish_reason == "stop" and isinstance(ended.outputs[0].stop_reason, str)
    assert ended.metrics["spec_num_drafts"] > 0
    assert 0 < ended.metrics["spec_num_accepted_tokens"] <= ended.metrics["spec_num_draft_tokens"]
    for llm in engines:
        llm.llm_engine.assert_idle()
