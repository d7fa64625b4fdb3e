"""The P/D decider's choices on hand-built worker states (no processes)."""

from __future__ import annotations

from tandem.router.pd import PDCosts, PDDecider
from tandem.router.types import WorkerState


def decider(**kw) -> PDDecider:
    return PDDecider(PDCosts(prefill_s_per_token=3e-4, link_bytes_per_s=1e9, hop_s=0.01,
                             kv_bytes_per_token=24_576, **kw), block_size=16)


def test_idle_decode_worker_keeps_every_prompt_local():
    d, p = WorkerState("http://d", role="decode"), WorkerState("http://p", role="prefill")
    for tokens in (20, 1000, 4000):
        assert not decider().plan(tokens, d, [p], {}).split


def test_busy_decode_worker_sheds_long_prompts_but_keeps_short_ones():
    d = WorkerState("http://d", role="decode", num_running=6)
    p = WorkerState("http://p", role="prefill")
    long_plan = decider().plan(1000, d, [p], {})
    assert long_plan.split and long_plan.prefill is p
    assert not decider().plan(4, d, [p], {}).split


def test_prefix_cached_on_the_decode_worker_stays_local():
    d = WorkerState("http://d", role="decode", num_running=6)
    p = WorkerState("http://p", role="prefill")
    assert not decider().plan(1000, d, [p], {"http://d": 62}).split  # 992 of 1000 tokens cached


def test_the_least_loaded_or_best_cached_prefill_worker_is_paired():
    d = WorkerState("http://d", role="decode", num_running=6)
    busy = WorkerState("http://p1", role="prefill", pending_prefill_tokens=5000)
    cached = WorkerState("http://p2", role="prefill")
    plan = decider().plan(1000, d, [busy, cached], {"http://p2": 30})
    assert plan.prefill is cached


def test_a_slow_link_or_a_queued_prefill_worker_keeps_the_prompt_local():
    d = WorkerState("http://d", role="decode", num_running=2, kv_transfer_bytes=1e6, kv_transfer_seconds=1.0)
    p = WorkerState("http://p", role="prefill")
    assert not decider().plan(1000, d, [p], {}).split  # 1 MB/s measured: 24 s to move the KV
    d2 = WorkerState("http://d2", role="decode", num_running=2)
    queued = WorkerState("http://p", role="prefill", pending_prefill_tokens=20_000)
    assert not decider().plan(1000, d2, [queued], {}).split


def test_threshold_mode_is_llm_d_rule_and_learning_moves_the_cost():
    d, p = WorkerState("http://d", role="decode"), WorkerState("http://p", role="prefill")
    fixed = PDDecider(PDCosts(), 16, threshold=256)
    assert fixed.plan(300, d, [p], {}).split and not fixed.plan(200, d, [p], {}).split
    dec = decider()
    for _ in range(30):
        dec.observe_prefill(1000, 0.01 + 1000 * 1e-3, {"kv_bytes_per_token": 4096})
    assert abs(dec.costs.prefill_s_per_token - 1e-3) < 1e-4 and dec.costs.kv_bytes_per_token == 4096


def test_the_request_s_own_tokens_are_not_a_queue_on_the_decode_worker():
    """The router counts a picked request's prompt on its decode worker before asking the decider."""
    d = WorkerState("http://d", role="decode", num_running=0, pending_prefill_tokens=1000)
    p = WorkerState("http://p", role="prefill")
    assert decider().plan(1000, d, [p], {}).split  # 1000 tokens of somebody else's ahead: ship it
    assert not decider().plan(1000, d, [p], {}, counted_on_decode=1000).split  # only itself: local
