"""Property-based fuzz of the sampling fields at their extremes (issue 17): through `tandem serve`
and through `tandem up --replicas 2`, no request gets a 5xx, the worker stays healthy, and once
the fuzz ends every account is back to idle (no sequence in flight, no block held)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import api_idle, free_port, metric, start_server, stop_server, wait_until

BIG_INTS = [0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 2**70,
            10**30]
ODD_FLOATS = [0.0, -0.0, 5e-324, 0.5, 1.0, 2.0, 2.0000001, 100.0, 1e30, -1e30, float("inf"), float("-inf"),
              float("nan")]
numbers = st.sampled_from(BIG_INTS + ODD_FLOATS) | st.integers() | st.floats()
token_lists = st.lists(st.sampled_from(BIG_INTS) | st.integers(min_value=0, max_value=600), min_size=0, max_size=8)
prompts = (st.text(min_size=0, max_size=40) | token_lists | st.lists(token_lists, min_size=0, max_size=3)
           | st.lists(st.text(max_size=10), min_size=0, max_size=3))
bias_keys = st.sampled_from(["0", "1", "-1", "²", "1e3", "99999999999", "0x10", " 7", "511", "512"]) | st.text(max_size=4)
SAMPLING_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "priority", "min_tokens", "logprobs"]

bodies = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": prompts},
    optional={**{f: numbers for f in SAMPLING_FIELDS},
              # generation stays short: large values are refused for the context length anyway
              "max_tokens": st.sampled_from([1, 2, 4, 0, -1, 600, 2**31, 2**63, 1e30, float("nan")]),
              "logit_bias": st.dictionaries(bias_keys, numbers, max_size=3),
              "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
              "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans()},
)


def _post(base: str, body: dict, headers: dict | None = None) -> httpx.Response:
    if isinstance(body.get("n"), int) and 2 < body["n"] <= 512:
        body["n"] = 2  # within the bounds, a wide fan-out only makes the fuzz slow
    payload = json.dumps(body, allow_nan=True)  # NaN and Infinity literals too: Python's JSON parser takes them
    return httpx.post(f"{base}/v1/completions", content=payload,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=120)


def _fuzz(base: str, max_examples: int, headers: dict | None = None) -> dict[int, int]:
    seen: dict[int, int] = {}

    @given(body=bodies)
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)  # the same cases every run
    def one(body):
        r = _post(base, body, headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.text[:500])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:500]

    one()
    return seen


def test_extreme_sampling_fields_through_the_server(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"])
    try:
        seen = _fuzz(base, max_examples=150)
        assert seen.get(200) and seen.get(400), seen  # reached the engine and the validator both
        assert httpx.get(f"{base}/health").status_code == 200
        wait_until(lambda: api_idle(base), 20, what="the server back to idle")
    finally:
        stop_server(proc)
    assert proc.returncode == 0


@pytest.mark.slow
def test_extreme_sampling_fields_through_tandem_up(model_dirs):
    """With --api-key: the router refuses clients without it, and the workers accept the router's."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", str(model_dirs["llama3-gqa"]), "--replicas",
                             "2", "--port", str(port), "--api-key", "fleet-key", "--worker-args",
                             "--kv-cache-memory 8MiB --served-model-name tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base, proc), 240, 0.3, "tandem up's router")
        assert _post(base, {"model": "tiny", "prompt": "x"}).status_code == 401  # the key is the fleet's
        seen = _fuzz(base, max_examples=60, headers={"authorization": "Bearer fleet-key"})
        assert seen.get(200) and seen.get(400), seen
        text = httpx.get(f"{base}/metrics").text
        workers = sorted({line.split('worker="')[1].split('"')[0] for line in text.splitlines()
                          if line.startswith("tandem_router_requests_in_flight{")})
        assert len(workers) == 2 and httpx.get(f"{base}/health").status_code == 200
        wait_until(lambda: all(api_idle(w) for w in workers)
                   and metric(httpx.get(f"{base}/metrics").text, "tandem_router_requests_in_flight") == 0,
                   20, what="both workers and the router back to idle")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]


def _healthy(base: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
