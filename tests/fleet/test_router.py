"""The router end to end: real `tandem serve` workers with KV events, `tandem router` and
`tandem up` as processes, the openai SDK through them, a worker killed under load."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tandem.engine.arg_utils import EngineArgs
from tests.helpers import (
    api_idle,
    engine_core_pid,
    free_port,
    metric_sum,
    start_server,
    stop_server,
    wait_healthy,
    wait_until,
)

WORKER_FLAGS = ("--max-num-seqs", "8")


def test_openai_sdk_through_router(fleet):
    url, _, _ = fleet
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    res = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0)
    assert res.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError):  # worker's 4xx passes through unchanged
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)


def test_model_names_through_the_router(fleet):
    url, _, _ = fleet
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    requests_before = metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_requests_total")
    for call in (lambda: client.models.retrieve("no-such-model"),
                 lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as err:  # 404: SDKs do not retry it, as they would a 503
            call()
        assert err.value.code == "model_not_found"
    assert metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_requests_total") == requests_before
    r = httpx.get(f"{url}/v1/no-such-endpoint")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_real_client_fields_through_the_router(fleet):
    """Structured outputs, echo with prompt logprobs, tool calls and /tokenizer_info reach a worker
    unchanged."""
    url, _, _ = fleet
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="tiny", prompt="pick:", max_tokens=8, temperature=1.0, seed=3,
                                    extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert out.choices[0].text in ("left", "right")
    echoed = client.completions.create(model="tiny", prompt="score this prompt", max_tokens=1, echo=True,
                                       logprobs=1, temperature=0)
    lp = echoed.choices[0].logprobs.token_logprobs
    assert echoed.choices[0].text.startswith("score this prompt") and lp[0] is None
    assert len(lp) == echoed.usage.prompt_tokens + 1 and all(x is not None for x in lp[1:])
    tool = {"type": "function", "function": {"name": "turn", "parameters": {
        "type": "object", "properties": {"to": {"enum": ["left", "right"]}}, "required": ["to"],
        "additionalProperties": False}}}
    called = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], tools=[tool],  # type: ignore[list-item]
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=40)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "turn" and call.function.arguments in ('{"to": "left"}', '{"to": "right"}')
    info = httpx.get(f"{url}/tokenizer_info")
    assert info.status_code == 200 and "eos_token" in info.json()


def test_shared_prefix_lands_on_the_worker_that_cached_it(fleet):
    url, _, worker_urls = fleet
    prefix = "common system prompt " * 12  # several full blocks
    indexed_before = metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_indexed_blocks")
    first = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prefix + "first", "max_tokens": 2},
                       timeout=60)
    assert first.status_code == 200
    full_blocks = first.json()["usage"]["prompt_tokens"] // EngineArgs.block_size
    wait_until(lambda: metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_indexed_blocks")
               >= indexed_before + full_blocks, what="the first prompt's KV events reach the router's index")
    cached = []
    for i in range(4):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prefix + f"then {i}", "max_tokens": 2},
                       timeout=60).json()
        cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert all(c >= 16 for c in cached), cached
    text = httpx.get(f"{url}/metrics").text
    assert metric_sum(text, "tandem_router_reported_cached_tokens_total") >= sum(cached)
    assert metric_sum(text, "tandem_router_requests_total") >= 5


def test_clients_gone_before_the_first_byte_release_their_worker(fleet):
    """A stream whose client left before the router relayed anything (even before the response
    started) still ends on the worker and leaves the router's in-flight count."""
    url, _, worker_urls = fleet
    body = {"model": "tiny", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client() as client:
        for i in range(6):
            try:
                with client.stream("POST", f"{url}/v1/completions", json={**body, "prompt": f"gone {i} " * 30},
                                   timeout=httpx.Timeout(30, read=0.002)) as r:
                    next(r.iter_lines())
            except httpx.ReadTimeout:
                pass
    deadline = time.monotonic() + 20
    while True:
        in_flight = metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_requests_in_flight")
        running = sum(metric_sum(httpx.get(f"{w}/metrics").text, "vllm:num_requests_running") for w in worker_urls)
        if in_flight == 0 and running == 0:
            break
        assert time.monotonic() < deadline, f"router in flight {in_flight}, workers running {running}"
        time.sleep(0.3)


def test_a_non_streaming_client_that_leaves_is_aborted_on_its_worker(fleet):
    """Issue 17, item 2 through the router: a non-streaming client that times out closes the
    router's request to its worker, which aborts every sequence (they run for tens of seconds
    when left alone, and would end "finished", not "aborted")."""
    url, _, worker_urls = fleet

    def aborted() -> float:
        return sum(metric_sum(httpx.get(f"{w}/metrics").text, "tandem:api_requests_ended_total", 'outcome="aborted"')
                   for w in worker_urls)

    def idle() -> bool:
        return (all(api_idle(w) for w in worker_urls)
                and metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_requests_in_flight") == 0)

    before = aborted()
    body = {"model": "tiny", "prompt": "a client that will not wait", "max_tokens": 480, "ignore_eos": True, "n": 32}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    left = time.monotonic()
    wait_until(lambda: aborted() > before, 15, what="the worker aborts the request")
    wait_until(idle, 15, what="every sequence ended and every block free, on the workers and in the router")
    assert time.monotonic() - left < 15


def test_killing_a_worker_under_load_leaves_no_hung_request(fleet):
    url, workers, worker_urls = fleet

    def one(i: int) -> str:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": f"load {i}", "max_tokens": 40, "ignore_eos": True,
                                    "stream": True}) as r:
                if r.status_code != 200:
                    return f"http {r.status_code}"
                body = "".join(r.iter_text())
            return "error" if '"error"' in body else "ok"
        except httpx.HTTPError as e:
            return type(e).__name__

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        wait_until(lambda: metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_requests_in_flight") >= 4,
                   what="the load is in flight")
        workers[1].kill()
        outcomes = [f.result(timeout=90) for f in futures]  # nothing hangs
    assert outcomes.count("ok") >= 1, outcomes
    wait_until(lambda: metric_sum(httpx.get(f"{url}/metrics").text, "tandem_router_worker_healthy",
                                  f'worker="{worker_urls[1]}"') == 0, what="the dead worker has left the pool")
    for i in range(4):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"after {i}", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.fixture
def pair(model_dirs):
    """Two plain workers (no KV events) and a round-robin `tandem router` in front, all stopped after."""
    model = model_dirs["llama3-gqa"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = [f.result() for f in [pool.submit(start_server, model, *WORKER_FLAGS) for _ in range(2)]]
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "tandem.cli", "router", "--port", str(port), "--tokenizer",
                               str(model), "--policy", "round-robin", "--seed", "0",
                               *[a for _, base in started for a in ("--worker", base)]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, router)
        yield url, [proc for proc, _ in started], [base for _, base in started]
    finally:
        for proc in [router, *(proc for proc, _ in started)]:
            stop_server(proc)


def test_a_request_whose_engine_core_dies_goes_to_no_other_worker(pair):
    """Issue 17, item 1: a worker whose engine core dies under a request answers 500 engine_dead
    (not 503 + Retry-After, which reads as overload), so the router answers 502 worker_failed and
    the request, which may be what killed the core, reaches no other worker."""
    url, procs, bases = pair

    def accepted(base: str) -> float:
        return metric_sum(httpx.get(f"{base}/metrics").text, "tandem:api_requests_accepted_total")

    def running_on() -> str | None:
        return next((b for b in bases if metric_sum(httpx.get(f"{b}/metrics").text, "vllm:num_requests_running")), None)

    before = {b: accepted(b) for b in bases}
    body = {"model": "tiny", "prompt": "the last request of this core", "max_tokens": 480, "ignore_eos": True, "n": 8}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=120)
        victim = wait_until(running_on, 60, what="the request runs on a worker")
        os.kill(engine_core_pid(procs[bases.index(victim)].pid), signal.SIGKILL)
        r = answer.result(timeout=120)
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_failed", r.text[:500]
    other = next(b for b in bases if b != victim)
    assert accepted(other) == before[other], "the request was sent to the other worker"
    assert httpx.post(f"{other}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_tandem_up_starts_and_stops_a_fleet(model_dirs):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", str(model_dirs["llama3-gqa"]), "--replicas", "2",
                             "--port", str(port), "--policy", "round-robin",
                             "--worker-args", "--kv-cache-memory 8MiB --served-model-name tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=240)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for i in range(4):
            assert client.completions.create(model="tiny", prompt=f"p{i}", max_tokens=2).usage.completion_tokens == 2
        text = httpx.get(f"{url}/metrics").text
        used = [line for line in text.splitlines()
                if line.startswith("tandem_router_requests_total{") and 'decision="round-robin"' in line]
        assert len(used) == 2, text  # both workers got requests
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "tandem up: 2 workers" in out
    # Helpers (multiprocessing's resource tracker) leave once their parent's pipe closes: allow a moment.
    deadline = time.monotonic() + 20
    while (children := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not children, f"processes outlived tandem up: {children}"


def _session_members(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split(None, 1)[0] == str(sid)]
