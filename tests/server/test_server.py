"""`tandem serve` as a real process, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tandem import LLM, SamplingParams
from tests.helpers import free_port, start_server, stop_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").status_code == 200
    assert "version" in httpx.get(f"{server}/version").json()


def test_completion_matches_offline_engine(client, model_dirs):
    prompt = "def fibonacci(n):"
    res = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    llm = LLM(model=str(model_dirs["llama3-gqa"]), kv_cache_memory="8MiB")
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert res.choices[0].text == ref.outputs[0].text
    assert res.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_completion_token_prompts_n_and_seed(client):
    res = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=5, n=2, seed=3,
                                    temperature=1.0)
    assert sorted(c.index for c in res.choices) == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=5, n=2, seed=3,
                                      temperature=1.0)
    assert [c.text for c in res.choices] == [c.text for c in again.choices]


def test_streaming_completion_with_usage(client):
    stream = client.completions.create(model="tiny", prompt="import os\n", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model="tiny", prompt="import os\n", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"


def test_streaming_n_each_choice_ends_exactly_once(client):
    """With n > 1 each choice's finish_reason goes out once, after all of its tokens."""
    stream = client.completions.create(model="tiny", prompt="x = ", max_tokens=12, n=3, seed=1, stream=True,
                                       extra_body={"ignore_eos": True})
    finishes = [ch.index for c in stream for ch in c.choices if ch.finish_reason is not None]
    assert sorted(finishes) == [0, 1, 2]
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                            max_tokens=9, seed=1, stream=True, extra_body={"ignore_eos": True})
    finishes = [ch.index for c in stream for ch in c.choices if ch.finish_reason is not None]
    assert sorted(finishes) == [0, 1]


def test_chat_streaming_and_logprobs(client):
    msgs = [{"role": "user", "content": "hello"}]
    res = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == res.choices[0].message.content
    # a conversation too long to render inline is templated off the event loop, then refused cleanly
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 5000}],
                                       max_tokens=4)
    assert err.value.code == "context_length_exceeded"


def test_stop_string_and_cached_tokens(client):
    prompt = list(range(10, 90))  # 80 tokens: 5 full blocks, cached on the second request
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    text = first.choices[0].text
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    if len(text) > 2:
        stop = text[1:3]
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


BAD = [
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 1000}, 400, "n"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 2**63}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 200}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x", "n": "two"}, 400, "n"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": "x", "top_k": -5}, 400, "top_k"),
]

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6}, "max_tokens"),
    ({"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(server, body, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_no_blocks_leak_after_bad_requests(server):
    for body, _, _ in BAD:
        httpx.post(f"{server}/v1/completions", json={"model": "tiny", **body} if "model" not in body else body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{server}/metrics").text
        if _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_requests(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if body.get("max_tokens") == 100000:
        assert err["code"] == "context_length_exceeded"


def test_malformed_and_huge_bodies(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2})
    assert r.status_code == 400
    r = httpx.post(f"{server}/v1/completions", content=b"x" * (10 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    chunked = (b"x" * 2**20 for _ in range(10))  # no content-length: counted as it arrives
    r = httpx.post(f"{server}/v1/completions", content=chunked, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body larger")
    r = httpx.get(f"{server}/v1/models", headers={"x-big": "y" * (100 * 2**10)})  # headers over 64 KiB
    assert r.status_code == 431 and "error" in r.json()
    # still serving
    assert httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_tokenize_detokenize(server):
    toks = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": "def f(x):"}).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(f"{server}/detokenize", json={"model": "tiny", "tokens": toks["tokens"]}).json()["prompt"]
    assert text.endswith("def f(x):")
    assert httpx.post(f"{server}/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_engine_death_turns_health_503_and_server_exits_nonzero(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"])
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        engine_pids = [int(p) for p in children  # the spawned engine core, not the resource tracker
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert engine_pids
        max_len = httpx.get(f"{base}/v1/models").json()["data"][0]["max_model_len"]
        body = {"model": "tiny", "prompt": "a", "max_tokens": max_len - 8, "n": 4, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            for pid in engine_pids:
                os.kill(pid, signal.SIGKILL)
            rest = list(lines)
        assert any('"code": "engine_dead"' in line for line in rest), rest[-3:]  # not retryable (issue 17)
        deadline = time.monotonic() + 10
        codes = set()
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                codes.add(httpx.get(f"{base}/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert 503 in codes
        proc.wait(30)
        assert proc.returncode not in (0, None)
    finally:
        if proc.poll() is None:
            proc.kill()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_metrics_have_vllm_names(server, client):
    client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:cache_config_info"):
        assert name in text, name
    assert _metric(text, "vllm:generation_tokens_total") >= 4
    assert 'block_size="16"' in text and 'cache_dtype="auto"' in text


def _samples(base: str) -> dict[tuple[str, frozenset], float]:
    """/metrics through prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_dashboard_metrics_count_each_request_once(server, client):
    """The request histograms vLLM dashboards read, the engine's step sizes, and HTTP and process
    metrics, each asserted as a delta over one request (n=2, max_tokens=5)."""
    _wait_idle(server)
    before = _samples(server)
    out = client.completions.create(model="tiny", prompt="dashboards " * 7, max_tokens=5, n=2, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    _wait_idle(server)
    httpx.post(f"{server}/v1/no-such-route", json={})
    after = _samples(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("vllm:request_params_n_count") == 1 and delta("vllm:request_params_n_sum") == 2
    assert delta("vllm:request_params_max_tokens_sum") == 5
    assert delta("vllm:request_prompt_tokens_sum") == out.usage.prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == 10 == out.usage.completion_tokens
    assert delta("vllm:request_max_num_generation_tokens_sum") == 5
    assert delta("vllm:request_time_per_output_token_seconds_count") == 1
    # one sample per token after a request's first (n=2: the other choice's first token counts too)
    assert delta("vllm:time_per_output_token_seconds_count") == delta("vllm:inter_token_latency_seconds_count") >= 8
    # every step's tokens: both prompts' prefill plus one token per sequence per decode step
    assert delta("vllm:iteration_tokens_total_count") >= 4
    assert delta("vllm:iteration_tokens_total_sum") >= out.usage.prompt_tokens + 8
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="2xx") == 1
    assert delta("http_request_duration_seconds_count", handler="/v1/completions", method="POST") == 1
    assert delta("http_requests_total", handler="none", method="POST", status="4xx") == 1
    assert _value(after, "process_resident_memory_bytes") > 0


def test_request_phase_histograms_add_up(server, client):
    """Queue, prefill and decode time (vLLM's names) per finished request, from the core's clock:
    prefill + decode is the inference time and fits inside the end-to-end latency."""
    before = httpx.get(f"{server}/metrics").text
    client.completions.create(model="tiny", prompt="phases " * 20, max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    after = _wait_idle(server)

    def delta(name: str) -> float:
        return _metric(after, name) - _metric(before, name)

    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"vllm:request_{phase}_time_seconds_count") == 1, phase
    prefill, decode = delta("vllm:request_prefill_time_seconds_sum"), delta("vllm:request_decode_time_seconds_sum")
    assert prefill > 0 and decode > 0 and delta("vllm:request_queue_time_seconds_sum") >= 0
    assert delta("vllm:request_inference_time_seconds_sum") == pytest.approx(prefill + decode)
    assert prefill + decode <= delta("vllm:e2e_request_latency_seconds_sum")


def _wait_idle(base: str, timeout_s: float = 30) -> str:
    """Poll /metrics until nothing runs, nothing waits and no KV block is held; return the text."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{base}/metrics").text
        if (_metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:num_requests_waiting") == 0
                and _metric(text, "vllm:kv_cache_usage_perc") == 0):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.3)


def test_disconnecting_clients_abort_and_free_blocks(server):
    """200 streaming requests (n=1 or 2, more than the KV cache holds, so some queue and some are
    preempted); half the clients hang up at a random moment: before admission, mid-prefill or
    mid-decode. Afterwards nothing runs or waits and every block is free."""
    import asyncio
    import random

    rng = random.Random(0)
    plans = [(i, rng.uniform(0.0, 6.0) if i % 2 else None) for i in range(200)]

    async def stream(http: httpx.AsyncClient, i: int) -> int:
        body = {"model": "tiny", "prompt": f"request {i} " * (1 + i % 7), "max_tokens": 80, "ignore_eos": True,
                "stream": True, "n": 1 + i % 2}
        async with http.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            return sum([1 async for line in r.aiter_lines() if line.startswith("data: {")])

    async def one(http: httpx.AsyncClient, i: int, hang_up_after: float | None) -> str:
        try:
            chunks = await asyncio.wait_for(stream(http, i), hang_up_after)
        except TimeoutError:
            return "disconnected"  # wait_for cancels the stream, which closes the connection
        assert chunks == 80 * (1 + i % 2), (i, chunks)
        return "finished"

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i, t) for i, t in plans))

    outcomes = asyncio.run(main())
    assert outcomes.count("finished") >= 100 and outcomes.count("disconnected") >= 20, outcomes
    text = _wait_idle(server)
    assert _metric(text, "vllm:request_success_total") >= 100
    # and it still serves
    assert httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_admission_control_answers_503_with_retry_after(model_dirs):
    from concurrent.futures import ThreadPoolExecutor

    proc, base = start_server(model_dirs["llama3-gqa"], "--max-num-seqs", "1", "--max-queued-requests", "1")
    try:
        max_len = httpx.get(f"{base}/v1/models").json()["data"][0]["max_model_len"]
        body = {"model": "tiny", "prompt": "a", "max_tokens": min(100, max_len - 8), "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{base}/v1/completions", json=body, timeout=120), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "overloaded"
        assert httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "b", "max_tokens": 2}).status_code == 200
    finally:
        stop_server(proc)


def test_kv_events_published_signed_and_replayable(model_dirs):
    import msgspec
    import zmq

    from tandem.engine.kv_events import BlockStored, KVEventBatch
    from tandem.engine.kv_publisher import END_OF_REPLAY, KV_EVENTS_CHANNEL, TOPIC, sign
    from tandem.zmq_auth import present_secret

    pub_port, replay_port = free_port(), free_port()
    secret = b"s3cret"
    os.environ["TANDEM_KV_EVENTS_SECRET"] = secret.decode()
    try:
        proc, base = start_server(model_dirs["llama3-gqa"], "--kv-events-endpoint", f"tcp://127.0.0.1:{pub_port}",
                                   "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay_port}")
    finally:
        del os.environ["TANDEM_KV_EVENTS_SECRET"]
    ctx = zmq.Context()
    sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    for sock in (sub, dealer):  # the publisher's ports admit only holders of the secret (ZMQ PLAIN)
        present_secret(sock, secret, KV_EVENTS_CHANNEL)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        sub.connect(f"tcp://127.0.0.1:{pub_port}")
        time.sleep(0.5)  # PUB/SUB: let the subscription reach the publisher
        prompt = list(range(10, 60))  # 50 tokens: 3 full blocks
        assert httpx.post(f"{base}/v1/completions",
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 2}).status_code == 200
        assert sub.poll(10_000)
        topic, seq, payload, mac = sub.recv_multipart()
        assert hmac_ok(secret, seq, payload, mac, sign)
        batch = msgspec.msgpack.decode(payload, type=KVEventBatch)
        assert batch.seq == int.from_bytes(seq, "big", signed=True) == 0
        stored = [e for e in batch.events if isinstance(e, BlockStored)]
        assert [t for e in stored for t in e.token_ids] == prompt[:48]
        # a subscriber that missed everything asks for a replay from 0
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big", signed=True)])
        replies = []
        while True:
            assert dealer.poll(10_000)
            _, rseq, rpayload, rmac = dealer.recv_multipart()
            if rseq == END_OF_REPLAY:
                break
            replies.append((rseq, rpayload, rmac))
        assert replies and replies[0] == (seq, payload, mac)
    finally:
        sub.close(0)
        dealer.close(0)
        ctx.term()
        stop_server(proc)


def hmac_ok(secret, seq, payload, mac, sign) -> bool:
    import hmac as _hmac

    return _hmac.compare_digest(mac, sign(secret, seq, payload))


# -- schemathesis: requests generated from the server's own OpenAPI schema never get a 5xx ----------
def _bounded(case) -> None:
    """Keep generation short: the fuzz is about input handling, not about long outputs."""
    if not isinstance(case.body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(case.body.get(key), int) and case.body[key] > 8:
            case.body[key] = 8
    if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
        case.body["n"] = 2


def test_schemathesis_no_server_errors(server, monkeypatch):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.internal.conjecture import providers

    # Hypothesis also draws from the literals of every local module imported (tandem's source), so
    # any edit anywhere in tandem would change the cases; without them they depend on the schema only.
    monkeypatch.setattr(providers, "_get_local_constants", lambda: providers.Constants(), raising=False)
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    seen: dict[str, set[int]] = {}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same cases every run: a fuzz that passes once passes always
        def fuzz(case):
            _bounded(case)
            response = case.call(timeout=60)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400 and case.path != "/openapi.json":
                assert set(response.json()["error"]) >= {"message", "type", "param", "code"}, response.text

        fuzz()
    # the fuzz reached the engine, not only the validator
    assert 200 in seen["POST /v1/completions"] and 400 in seen["POST /v1/completions"], seen
    assert _wait_idle(server)
