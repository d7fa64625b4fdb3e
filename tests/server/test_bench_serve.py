"""`tandem bench serve`: metrics against hand-computed traces, arrivals, datasets, and end-to-end
runs against a real `tandem serve`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.bench.serve import arrival_times, build_parser_for_tests
from tandem.bench.serve_metrics import RequestResult, compute_metrics, max_goodput, meets_slos, parse_goodput
from tests.helpers import start_server, stop_server


def _trace() -> list[RequestResult]:
    # A: 4 chunks (one carried 2 tokens) -> 5 tokens; B: a single token; C: failed
    a = RequestResult(10, 5, ttft=0.1, itl=[0.05, 0.05, 0.1], latency=0.3, output_tokens=5, success=True)
    b = RequestResult(20, 1, ttft=0.2, itl=[], latency=0.2, output_tokens=1, success=True)
    c = RequestResult(30, 5, error="HTTP 500")
    return [a, b, c]


def test_metrics_match_hand_computed_trace():
    m = compute_metrics(_trace(), duration_s=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 6)
    assert m["request_throughput"] == pytest.approx(1.0) and m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0) and m["request_goodput"] is None
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["std_ttft_ms"] == pytest.approx(50)
    assert m["p99_ttft_ms"] == pytest.approx(199)
    # TPOT = (E2EL - TTFT) / (tokens - 1), only for requests with > 1 token: A's (0.3-0.1)/4
    assert m["mean_tpot_ms"] == pytest.approx(50) and m["p99_tpot_ms"] == pytest.approx(50)
    # ITL: one gap per chunk, whatever the chunk carried
    assert m["mean_itl_ms"] == pytest.approx(200 / 3) and m["median_itl_ms"] == pytest.approx(50)
    assert m["p99_itl_ms"] == pytest.approx(99)
    assert m["mean_e2el_ms"] == pytest.approx(250) and m["p50_e2el_ms"] == pytest.approx(250)


def test_goodput_counts_requests_meeting_every_slo():
    trace = _trace()
    assert compute_metrics(trace, 2.0, [99], {"ttft": 150})["request_goodput"] == pytest.approx(0.5)
    # B has one token: its TPOT counts as 0, so it meets a TPOT SLO that A (50 ms) misses
    assert [meets_slos(r, {"tpot": 40}) for r in trace] == [False, True, False]
    assert compute_metrics(trace, 2.0, [99], {"ttft": 150, "tpot": 40})["request_goodput"] == 0
    assert parse_goodput(["ttft:200", "e2el:1000"]) == {"ttft": 200.0, "e2el": 1000.0}
    with pytest.raises(ValueError):
        parse_goodput(["itl:5"])


def test_max_goodput_is_highest_rate_with_90_percent_attainment():
    good = RequestResult(1, 2, ttft=0.01, latency=0.02, output_tokens=2, success=True)
    bad = RequestResult(1, 2, ttft=5.0, latency=6.0, output_tokens=2, success=True)
    sweep = [(1.0, [good] * 10), (2.0, [good] * 9 + [bad]), (4.0, [good] * 8 + [bad] * 2)]
    assert max_goodput(sweep, {"ttft": 100}) == 2.0
    assert max_goodput([(1.0, [bad])], {"ttft": 100}) is None


def test_arrivals_follow_vllm_schedule():
    times = arrival_times(200, rate=4.0, burstiness=1.0, seed=0)
    assert times == sorted(times) and times[-1] == pytest.approx(200 / 4.0)
    gaps = np.diff([0.0, *times])
    assert 0.5 < np.std(gaps) / np.mean(gaps) < 1.5  # Poisson: coefficient of variation ~ 1
    steady = np.diff(arrival_times(50, rate=2.0, burstiness=float("inf"), seed=0))
    assert np.allclose(steady, 0.5)
    assert arrival_times(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    # vllm bench serve seeds numpy's global generator and draws one gamma gap per request.
    np.random.seed(7)
    vllm_gaps = np.cumsum([np.random.gamma(shape=0.5, scale=1 / (2.0 * 0.5)) for _ in range(20)])
    assert np.allclose(arrival_times(20, 2.0, 0.5, 7), vllm_gaps * (10.0 / vllm_gaps[-1]))
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, 0.0, 0)


@pytest.fixture(scope="module")
def bench_server(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"])
    yield base, model_dirs["llama3-gqa"]
    stop_server(proc)


def _run(base, model_dir, tmp_path, *extra):
    from tandem.bench.serve import run_serve

    args = build_parser_for_tests().parse_args(
        ["--base-url", base, "--tokenizer", str(model_dir), "--disable-tqdm", "--result-dir", str(tmp_path),
         "--save-result", "--ignore-eos", *extra])
    return run_serve(args)


def test_random_run_counts_every_token(bench_server, tmp_path):
    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--num-prompts", "6", "--random-input-len", "24", "--random-output-len",
             "6", "--request-rate", "20", "--max-concurrency", "3", "--metric-percentiles", "50,90",
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--goodput", "ttft:60000")
    assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == sum(r["output_lens"]) == 36
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert all(len(itl) == 5 for itl in r["itls"])  # tandem streams one token per chunk here
    for key in ("median_ttft_ms", "p90_tpot_ms", "p50_itl_ms", "mean_e2el_ms", "total_token_throughput"):
        assert r[key] > 0, key
    saved = json.loads(next(tmp_path.glob("serve-run-*.json")).read_text())
    assert saved["completed"] == 6 and saved["model_id"] == "tiny"


def test_shared_prefix_run_hits_the_prefix_cache(bench_server, tmp_path):
    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--dataset-name", "shared-prefix", "--backend", "openai-chat",
             "--num-prompts", "8", "--shared-prefix-num-groups", "2", "--shared-prefix-system-len", "64",
             "--shared-prefix-question-len", "8", "--shared-prefix-output-len", "4", "--max-concurrency", "2")
    assert r["completed"] == 8 and r["server_metrics"]["prefix_cache_hit_rate"] > 0.3


def test_interference_reports_groups_and_sharegpt_loads(bench_server, tmp_path):
    from tandem.bench.serve_datasets import synthetic_sharegpt

    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--dataset-name", "interference", "--num-prompts", "6",
             "--request-rate", "6", "--interference-chat-input-len", "16", "--interference-chat-output-len", "6",
             "--interference-long-input-len", "200", "--interference-long-output-len", "2",
             "--interference-long-interval", "0.4", "--interference-num-long", "2")
    assert set(r["groups"]) == {"chat", "long"}
    assert r["groups"]["chat"]["completed"] == 6 and r["groups"]["long"]["completed"] == 2
    path = synthetic_sharegpt(tmp_path / "sharegpt.json", 40)
    r = _run(base, model_dir, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path),
             "--num-prompts", "4", "--sharegpt-output-len", "4", "--request-rate", "inf")
    assert r["completed"] == 4 and r["total_output_tokens"] == 16


def test_multi_turn_extends_each_conversation_and_reports_turns(bench_server, tmp_path):
    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--dataset-name", "multi-turn", "--multi-turn-conversations", "2",
             "--multi-turn-turns", "3", "--multi-turn-context-len", "48", "--multi-turn-user-len", "8",
             "--multi-turn-reply-len", "8", "--multi-turn-output-len", "3", "--request-rate", "20")
    assert set(r["groups"]) == {"turn-0", "turn-1", "turn-2"}
    assert all(g["completed"] == 2 for g in r["groups"].values())
    assert r["server_metrics"]["prefix_cache_hit_rate"] > 0.3, "later turns extend the earlier prompts"


def test_sweep_reports_max_goodput(bench_server, tmp_path):
    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--num-prompts", "4", "--random-input-len", "16", "--random-output-len",
             "4", "--sweep", "request-rate=5,50", "--goodput", "e2el:60000")
    assert [run["request_rate"] for run in r["sweep"]] == [5.0, 50.0]
    assert r["max_goodput"] == 50.0


def test_failed_requests_are_counted_not_raised(bench_server, tmp_path):
    base, model_dir = bench_server
    r = _run(base, model_dir, tmp_path, "--model", "no-such-model", "--num-prompts", "2",
             "--random-input-len", "8", "--random-output-len", "2")
    assert r["completed"] == 0 and r["failed"] == 2 and "404" in r["errors"][0]
