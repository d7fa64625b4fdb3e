"""Router policy: filters, scorers, pickers, the hot-spot guard and building policies from names,
dicts and YAML. No network, no engine."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from tandem.router.policy import (
    BUILTIN_POLICIES,
    HealthyFilter,
    KVCacheUtilizationScorer,
    MaxScorePicker,
    ModelServedFilter,
    NotSaturatedFilter,
    Policy,
    PrefillCostScorer,
    PrefixCacheScorer,
    PrefixMatcher,
    QueueDepthScorer,
    RoleFilter,
    RoundRobinPicker,
    RunningRequestsScorer,
    SessionAffinityScorer,
    WeightedRandomPicker,
    build_policy,
    load_policy_file,
)
from tandem.router.types import RouteRequest, WorkerState

A, B, C = "http://a:1", "http://b:1", "http://c:1"
HASHES = [b"h0", b"h1", b"h2", b"h3"]


class FakeMatcher:
    """Fixed url -> matched leading blocks, all on the device (weight 1); ``record`` makes a worker
    hold every block."""

    def __init__(self, matched: dict[str, int] | None = None) -> None:
        self.matched = dict(matched or {})

    def match_blocks(self, block_hashes):
        return {u: min(n, len(block_hashes)) for u, n in self.matched.items()}

    def match_weighted(self, block_hashes):
        return {u: float(n) for u, n in self.match_blocks(block_hashes).items()}

    def record(self, worker: str, block_hashes) -> None:
        self.matched[worker] = len(block_hashes)

    def num_blocks(self, worker: str) -> int:
        return self.matched.get(worker, 0)


def W(url: str, **kw) -> WorkerState:
    return WorkerState(url=url, **kw)


def req(hashes=HASHES, session: str | None = None, model: str = "m") -> RouteRequest:
    return RouteRequest(model=model, token_ids=list(range(4 * len(hashes))), block_hashes=list(hashes), session_id=session)


def urls(workers) -> list[str]:
    return [w.url for w in workers]


def test_fake_matcher_satisfies_protocol():
    assert isinstance(FakeMatcher(), PrefixMatcher)


# ------------------------------------------------------------------------------------ filters


def test_healthy_filter():
    ws = [W(A), W(B, healthy=False), W(C)]
    assert urls(HealthyFilter()(req(), ws)) == [A, C]


def test_model_served_filter_keeps_unknown():
    ws = [W(A, models={"m"}), W(B, models={"other"}), W(C)]
    assert urls(ModelServedFilter()(req(model="m"), ws)) == [A, C]


def test_role_filter():
    ws = [W(A, role="prefill"), W(B, role="decode"), W(C, role="both")]
    assert urls(RoleFilter("prefill")(req(), ws)) == [A, C]
    assert urls(RoleFilter("decode")(req(), ws)) == [B, C]
    assert urls(RoleFilter("both")(req(), ws)) == [C]
    with pytest.raises(ValueError):
        RoleFilter("gpu")


def test_not_saturated_filter_load_and_kv():
    f = NotSaturatedFilter(queue_allowance=2, kv_threshold=0.9)
    ws = [
        W(A, max_num_seqs=4, num_running=4, num_waiting=1),  # load 5 < 6
        W(B, max_num_seqs=4, num_running=4, num_waiting=2),  # load 6 >= 6
        W(C, kv_usage=0.9),  # kv at threshold
        W("http://d:1", in_flight=6, max_num_seqs=4),  # router's own count 6 >= 6
    ]
    assert urls(f(req(), ws)) == [A]


def test_not_saturated_default_kv_threshold():
    f = NotSaturatedFilter()
    assert urls(f(req(), [W(A, kv_usage=0.97), W(B, kv_usage=0.98)])) == [A]


def test_not_saturated_keeps_all_when_all_saturated():
    f = NotSaturatedFilter(queue_allowance=0)
    ws = [W(A, max_num_seqs=1, in_flight=1), W(B, kv_usage=1.0)]
    assert urls(f(req(), ws)) == [A, B]
    assert f(req(), []) == []


# ------------------------------------------------------------------------------------ scorers


def test_prefix_cache_scorer():
    s = PrefixCacheScorer(FakeMatcher({A: 4, B: 1, "http://gone:1": 3}))
    assert s(req(), [W(A), W(B), W(C)]) == {A: 1.0, B: 0.25, C: 0.0}
    assert s(req(hashes=[]), [W(A), W(B)]) == {A: 0.0, B: 0.0}


def test_prefill_cost_scorer():
    # req(): 4 blocks of 4 tokens = 16 tokens; with block_size 4, A holds all, B one block, C none.
    s = PrefillCostScorer(FakeMatcher({A: 4, B: 1}), block_size=4)
    ws = [W(A, pending_prefill_tokens=8), W(B), W(C)]
    assert s.costs(req(), ws) == {A: 8, B: 12, C: 16}
    assert s(req(), ws) == {A: 0.5, B: 0.25, C: 0.0}
    # two busy workers with equal request counts: the one whose backlog is cache hits wins
    busy = [W(A, in_flight=1, pending_prefill_tokens=1000), W(B, in_flight=1, pending_prefill_tokens=40)]
    assert s(req(hashes=[]), busy)[B] > s(req(hashes=[]), busy)[A]
    assert PrefillCostScorer(FakeMatcher())(req(hashes=[]), [W(A), W(B)]) == {A: 1.0, B: 1.0}


def test_queue_depth_scorer():
    s = QueueDepthScorer()
    assert s(req(), [W(A, num_waiting=4), W(B, num_waiting=1), W(C)]) == {A: 0.0, B: 0.75, C: 1.0}
    assert s(req(), [W(A), W(B)]) == {A: 1.0, B: 1.0}


def test_kv_cache_utilization_scorer():
    got = KVCacheUtilizationScorer()(req(), [W(A, kv_usage=0.25), W(B, kv_usage=1.0)])
    assert got == {A: 0.75, B: 0.0}


def test_running_requests_scorer():
    s = RunningRequestsScorer()
    got = s(req(), [W(A, num_running=8), W(B, num_running=2, num_waiting=2), W(C, in_flight=6)])
    assert got == {A: 0.0, B: 0.5, C: 0.25}
    assert s(req(), [W(A), W(B)]) == {A: 1.0, B: 1.0}


def test_session_affinity_scorer_lru():
    s = SessionAffinityScorer(capacity=2)
    ws = [W(A), W(B)]
    assert s(req(session="s1"), ws) == {A: 0.0, B: 0.0}
    s.observe(req(session="s1"), B)
    assert s(req(session="s1"), ws) == {A: 0.0, B: 1.0}
    assert s(req(session=None), ws) == {A: 0.0, B: 0.0}
    s.observe(req(session="s2"), A)
    s.observe(req(session="s1"), A)  # s1 moves to A and becomes most recent
    s.observe(req(session="s3"), B)  # evicts s2
    assert s(req(session="s1"), ws) == {A: 1.0, B: 0.0}
    assert s(req(session="s2"), ws) == {A: 0.0, B: 0.0}
    assert len(s.sessions) == 2


# ------------------------------------------------------------------------------------ pickers


def test_max_score_picks_highest():
    p = MaxScorePicker(random.Random(0))
    assert p([W(A), W(B), W(C)], {A: 0.2, B: 0.9, C: 0.5}).url == B


def test_max_score_ties_uniform():
    p = MaxScorePicker(random.Random(1))
    ws = [W(C), W(A), W(B)]
    counts = Counter(p(ws, {A: 0.5, B: 0.5, C: 0.5}).url for _ in range(300))
    assert set(counts) == {A, B, C}
    assert all(60 <= n <= 140 for n in counts.values()), counts  # sd ~8.2


def test_max_score_deterministic_under_seed():
    ws = [W(A), W(B), W(C)]
    scores = {A: 1.0, B: 1.0, C: 1.0}
    runs = [[MaxScorePicker(random.Random(7))(ws, scores).url for _ in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_weighted_random_proportions():
    p = WeightedRandomPicker(random.Random(2))
    ws = [W(A), W(B), W(C)]
    n = 3000
    counts = Counter(p(ws, {A: 0.1, B: 0.3, C: 0.6}).url for _ in range(n))
    for url, want in ((A, 0.1), (B, 0.3), (C, 0.6)):
        assert abs(counts[url] / n - want) < 0.04, counts


def test_weighted_random_all_zero_uniform():
    p = WeightedRandomPicker(random.Random(3))
    counts = Counter(p([W(A), W(B), W(C)], {A: 0.0, B: 0.0, C: 0.0}).url for _ in range(300))
    assert all(60 <= n <= 140 for n in counts.values()), counts  # sd ~8.2


def test_round_robin_order_and_changing_candidates():
    p = RoundRobinPicker()
    ws = [W(C), W(A), W(B)]
    scores = {A: 0.0, B: 1.0, C: 0.5}
    assert [p(ws, scores).url for _ in range(7)] == [A, B, C, A, B, C, A]
    assert p([W(A), W(C)], scores).url == C  # last was A; B gone -> next in URL order is C
    assert p([W(A), W(B)], scores).url == A  # nothing after C -> wrap


# ------------------------------------------------------------------------------------- policy


def test_policy_total_score_and_none_when_filtered_out():
    pol = Policy(
        filters=[HealthyFilter()],
        scorers=[(PrefixCacheScorer(FakeMatcher({A: 4})), 3.0), (KVCacheUtilizationScorer(), 1.0)],
        picker=MaxScorePicker(random.Random(0)),
    )
    ws = [W(A, kv_usage=1.0), W(B)]
    assert pol.scores(req(), ws) == {A: 0.75, B: 0.25}
    assert pol.pick(req(), ws).url == A
    assert pol.pick(req(), [W(A, healthy=False)]) is None
    assert pol.pick(req(), []) is None
    with pytest.raises(ValueError):
        Policy([], [(KVCacheUtilizationScorer(), -1.0)], MaxScorePicker())


def test_policy_observe_forwarded_and_record_flag():
    aff = SessionAffinityScorer()
    pol = Policy([], [(aff, 1.0)], MaxScorePicker(random.Random(0)))
    chosen = pol.pick(req(session="s"), [W(A), W(B)], record=False)
    assert aff.sessions == {}
    pol.observe(req(session="s"), chosen)
    assert aff.sessions == {"s": chosen.url}


def test_build_policy_builtins():
    m = FakeMatcher()
    rr = build_policy("round-robin", m)
    assert [type(f).__name__ for f in rr.filters] == ["HealthyFilter", "ModelServedFilter"]
    assert isinstance(rr.picker, RoundRobinPicker) and rr.hotspot_guard is None
    ll = build_policy("least-load", m)
    assert {s.name: w for s, w in ll.scorers} == {"running_requests": 1.0, "queue_depth": 1.0}
    assert isinstance(ll.picker, MaxScorePicker) and ll.hotspot_guard is None
    ca = build_policy(None, m)
    assert ca.name == "cache-aware"
    assert {s.name: w for s, w in ca.scorers} == {
        "prefix_cache": 2.0,
        "prefill_cost": 1.0,
        "running_requests": 1.0,
        "kv_cache_utilization": 0.5,
        "session_affinity": 1.0,
    }
    assert [f.name for f in ca.filters] == ["healthy", "model_served", "not_saturated"]
    assert ca.hotspot_guard is not None and ca.hotspot_guard.margin == 4.0
    assert set(BUILTIN_POLICIES) == {"round-robin", "least-load", "cache-aware"}


def test_round_robin_policy_cycles_over_healthy():
    pol = build_policy("round-robin", FakeMatcher())
    ws = [W(A), W(B, healthy=False), W(C)]
    assert [pol.pick(req(), ws).url for _ in range(4)] == [A, C, A, C]


YAML_CONFIG = """
filters: [healthy, model_served, {not_saturated: {kv_threshold: 0.95}}, {role: decode}]
scorers: {prefix_cache: 2, running_requests: 1, queue_depth: 1, session_affinity: {weight: 0.5, capacity: 8}}
picker: max_score
hotspot_margin: 4
"""


def _check_yaml_policy(pol: Policy) -> None:
    sat = pol.filters[2]
    assert isinstance(sat, NotSaturatedFilter) and sat.kv_threshold == 0.95
    assert isinstance(pol.filters[3], RoleFilter) and pol.filters[3].role == "decode"
    assert {s.name: w for s, w in pol.scorers} == {
        "prefix_cache": 2.0,
        "running_requests": 1.0,
        "queue_depth": 1.0,
        "session_affinity": 0.5,
    }
    assert pol.scorers[3][0].capacity == 8
    assert isinstance(pol.picker, MaxScorePicker)
    assert pol.hotspot_guard is not None and pol.hotspot_guard.margin == 4.0
    ws = [W(A, kv_usage=0.96), W(B), W(C, role="prefill")]
    assert pol.pick(req(), ws).url == B


def test_build_policy_from_yaml_string():
    _check_yaml_policy(build_policy(yaml.safe_load(YAML_CONFIG), FakeMatcher({A: 4}), random.Random(0)))


def test_load_policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(YAML_CONFIG)
    _check_yaml_policy(load_policy_file(path, FakeMatcher({A: 4}), random.Random(0)))
    named = tmp_path / "named.yaml"
    named.write_text("least-load\n")
    assert load_policy_file(named, FakeMatcher()).name == "least-load"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError):
        load_policy_file(bad, FakeMatcher())


def test_config_defaults_and_no_guard_without_margin():
    pol = build_policy({"scorers": {"queue_depth": 1}}, FakeMatcher())
    assert [f.name for f in pol.filters] == ["healthy", "model_served", "not_saturated"]
    assert isinstance(pol.picker, MaxScorePicker) and pol.hotspot_guard is None


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("fastest", "round-robin"),
        ({"filters": ["healthy", "nearby"]}, "not_saturated"),
        ({"scorers": {"latency": 1}}, "prefix_cache"),
        ({"picker": "best"}, "weighted_random"),
        ({"pickr": "max_score"}, "picker"),
    ],
)
def test_unknown_names_list_valid_ones(spec, needle):
    with pytest.raises(ValueError, match=needle):
        build_policy(spec, FakeMatcher())


def test_session_affinity_sticks():
    pol = build_policy("cache-aware", FakeMatcher(), random.Random(4))
    ws = [W(A), W(B), W(C)]
    first = pol.pick(req(hashes=[], session="s"), ws)
    assert all(pol.pick(req(hashes=[], session="s"), ws).url == first.url for _ in range(30))
    others = Counter(pol.pick(req(hashes=[], session=f"o{i}"), ws).url for i in range(60))
    assert len(others) == 3  # new sessions still spread over tied workers


# ----------------------------------------------------------------------------- hot-spot guard


def test_cache_aware_prefers_prefix_holder_when_loads_equal():
    pol = build_policy("cache-aware", FakeMatcher({B: 4}), random.Random(5))
    ws = [W(A, in_flight=3), W(B, in_flight=3), W(C, in_flight=3)]
    assert all(pol.pick(req(), ws, record=False).url == B for _ in range(100))


def _hot_setup(hot_load: int, prefix_inflight: int, seed: int = 6, cold_loads=(0, 2)):
    """B holds the whole prefix with ``hot_load`` requests, ``prefix_inflight`` of them this prefix."""
    pol = build_policy("cache-aware", FakeMatcher({B: 4}), random.Random(seed))
    hot = W(B, in_flight=hot_load)
    for _ in range(prefix_inflight):
        pol.observe(req(), hot)
    ws = [W(A, in_flight=cold_loads[0]), hot, W(C, in_flight=cold_loads[1])]
    return pol, ws, hot


def test_hotspot_diverts_documented_share_to_least_loaded():
    # hot load 20, all of it this prefix, min load 0, margin 4:
    # p = clamp(20/20) * clamp((20 - 0 - 4)/20) = 0.8.
    pol, ws, hot = _hot_setup(hot_load=20, prefix_inflight=20)
    assert pol.hotspot_guard.divert_probability(req(), hot, ws) == pytest.approx(0.8)
    n = 1000
    counts = Counter(pol.pick(req(), ws, record=False).url for _ in range(n))
    assert set(counts) <= {A, B}  # diverted requests go to the least-loaded other (A, load 0)
    assert 0.75 <= counts[A] / n <= 0.85, counts
    assert pol.hotspot_guard.diversions == counts[A]


def test_hotspot_share_scales_with_prefix_part_of_load():
    # Only 5 of the hot worker's 20 requests are this prefix: p = 0.25 * 0.8 = 0.2.
    pol, ws, hot = _hot_setup(hot_load=20, prefix_inflight=5)
    assert pol.hotspot_guard.divert_probability(req(), hot, ws) == pytest.approx(0.2)
    counts = Counter(pol.pick(req(), ws, record=False).url for _ in range(1000))
    assert 0.15 <= counts[A] / 1000 <= 0.25, counts


def test_hotspot_never_diverts_within_margin():
    for hot_load, cold in ((4, (0, 0)), (10, (6, 9)), (3, (0, 1))):
        pol, ws, hot = _hot_setup(hot_load=hot_load, prefix_inflight=hot_load, cold_loads=cold)
        assert pol.hotspot_guard.divert_probability(req(), hot, ws) == 0.0
        assert all(pol.pick(req(), ws, record=False).url == B for _ in range(300))
        assert pol.hotspot_guard.diversions == 0


def test_hotspot_ignores_requests_without_blocks_and_other_prefixes():
    pol, ws, hot = _hot_setup(hot_load=20, prefix_inflight=20)
    g = pol.hotspot_guard
    assert g.divert_probability(req(hashes=[]), hot, ws) == 0.0
    other = req(hashes=[b"x0", b"x1"])  # B still best match (the fake matches any), but 0 in flight
    assert g.divert_probability(other, hot, ws) == 0.0
    assert g.divert_probability(req(), ws[0], ws) == 0.0  # A holds no prefix


def test_hotspot_release_pairs_with_observe():
    pol, ws, hot = _hot_setup(hot_load=20, prefix_inflight=2)
    g = pol.hotspot_guard
    assert g.inflight == {(HASHES[0], B): 2}
    pol.release(req(), hot)
    pol.release(req(), hot)
    pol.release(req(), hot)  # extra release is ignored
    assert g.inflight == {}
    assert g.divert_probability(req(), hot, ws) == 0.0


def test_hotspot_spreads_a_popular_prefix_over_time():
    """Closed loop: each pick adds in flight and the chosen worker then holds the prefix."""
    matcher = FakeMatcher({B: 4})
    pol = build_policy("cache-aware", matcher, random.Random(8))
    ws = [W(A), W(B, in_flight=20), W(C)]
    for _ in range(20):
        pol.observe(req(), ws[1])
    for _ in range(200):
        w = pol.pick(req(), ws)
        w.in_flight += 1
        matcher.record(w.url, HASHES)
    loads = sorted(w.in_flight for w in ws)
    assert len(matcher.matched) >= 2  # the prefix got cached on a second worker
    assert loads[-1] - loads[0] <= 5, loads  # without the guard: 220 vs 0


def test_no_hotspot_guard_keeps_piling_on_holder():
    matcher = FakeMatcher({B: 4})
    pol = build_policy(
        {"scorers": {"prefix_cache": 2, "running_requests": 1, "kv_cache_utilization": 0.5}}, matcher, random.Random(8)
    )
    ws = [W(A), W(B, in_flight=20), W(C)]
    assert all(pol.pick(req(), ws).url == B for _ in range(50))


def test_router_counts_pending_prefill_until_first_byte():
    from tandem.router.app import Router, RouterMetrics
    from tandem.router.index import ApproxPrefixIndex, prompt_block_hashes
    from tandem.router.workers import WorkerPool, WorkerSpec

    pool = WorkerPool([WorkerSpec(A), WorkerSpec(B)])
    for w in pool.workers.values():
        w.healthy = True
    approx = ApproxPrefixIndex()
    router = Router(pool, build_policy("cache-aware", approx, rng=random.Random(0)), None, 16, approx, approx,
                    RouterMetrics(), "cache-aware")
    ids = list(range(100))
    first = router.pick(RouteRequest("m", ids, prompt_block_hashes(ids, 16)), set())
    assert first.worker.pending_prefill_tokens == 100 and first.worker.in_flight == 1
    # the same prompt again: the router predicts 6 cached blocks on the first worker (its history)
    second = router.pick(RouteRequest("m", ids, prompt_block_hashes(ids, 16)), set())
    assert second.worker is first.worker and second.prefill_tokens == 100 - 6 * 16
    router.first_byte(first)
    router.first_byte(first)  # idempotent
    assert first.worker.pending_prefill_tokens == 4
    router.release(first)
    router.release(second)
    assert all(w.pending_prefill_tokens == 0 and w.in_flight == 0 for w in pool.workers.values())
