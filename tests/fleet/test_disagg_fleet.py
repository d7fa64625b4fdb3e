"""Disaggregated serving end to end: `tandem up --prefill 1 --decode 1` (real processes, router
in front) against a single `tandem serve`, driven by the openai SDK."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.helpers import free_port, metric_sum, start_server, stop_server, wait_healthy

WORKER_ARGS = "--kv-cache-memory 8MiB --served-model-name tiny --kv-lease-s 3 --kv-transfer-timeout-s 3"


class Fleet:
    def __init__(self, model, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", str(model), "--prefill", "1",
                                      "--decode", "1", "--port", str(self.port), "--worker-args", WORKER_ARGS,
                                      *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # workers share the pipe: keep it flowing
        wait_healthy(self.url, self.proc, timeout_s=240)
        ready = next(line for line in self.lines if line.startswith("tandem up:"))
        self.prefill = re.search(r"(http://\S+) prefill", ready).group(1)
        self.decode = re.search(r"(http://\S+) decode", ready).group(1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def metric(self, url: str, name: str, label: str = "") -> float:
        return metric_sum(httpx.get(f"{url}/metrics").text, name, label)

    def wait_idle(self, *urls: str) -> None:
        """Workers (default: both) back to no request, no lease, no block in use."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            busy = sum(self.metric(u, n) for u in (urls or (self.prefill, self.decode))
                       for n in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                                 "tandem:kv_leases_held"))
            if busy == 0:
                return
            time.sleep(0.3)
        raise AssertionError("workers did not return to idle")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return self.proc.returncode


@pytest.fixture(scope="module")
def single(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"])
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    stop_server(proc)


@pytest.fixture(scope="module")
def fleet(model_dirs):
    fleet = Fleet(model_dirs["llama3-gqa"], "--pd-threshold", "1")  # split every prompt the decoder lacks
    yield fleet
    assert fleet.stop() == 0, "".join(fleet.lines[-50:])


def _text(client, prompt: str, max_tokens: int, stream: bool = False) -> str:
    if stream:
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


PROMPTS = ["x", "def f(a, b):\n    return", "import os\n" * 12, "class Stack:\n    def push(self, item):\n" * 9,
           " ".join(str(i) for i in range(150))]


def test_greedy_outputs_equal_a_single_server(fleet, single):
    splits = fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"')
    for i, prompt in enumerate(PROMPTS):
        assert _text(fleet.client, prompt, 16, stream=i % 2 == 1) == _text(single, prompt, 16), prompt[:40]
    chat = [{"role": "user", "content": "Write a function that reverses a list. " * 5}]
    got = fleet.client.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0)
    ref = single.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"') >= splits + 5
    assert fleet.metric(fleet.decode, "tandem:kv_transfers_total") >= 4
    assert fleet.metric(fleet.decode, "tandem:kv_transfers_shm_total") >= 4  # one host: shared memory
    # after the first ticket taught the router the prefill worker's KV endpoint, both legs go at once
    assert fleet.metric(fleet.url, "tandem_router_pd_concurrent_splits_total") >= 4
    fleet.wait_idle()


def test_list_form_prompts_are_split_like_plain_ones(fleet, single):
    """lm-eval sends ["text"] and [[ids]]: one prompt each, split as a plain prompt would be."""
    text = "def walk(tree):\n    for node in tree:\n" * 6
    ids = httpx.post(f"{fleet.decode}/tokenize", json={"prompt": text + "# a"}).json()["tokens"]
    expected = [_text(single, text, 8), single.completions.create(model="tiny", prompt=ids, max_tokens=8,
                                                                  temperature=0).choices[0].text]
    splits = fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"')
    got = [fleet.client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
           for p in ([text], [ids])]
    assert got == expected
    assert fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"') == splits + 2
    fleet.wait_idle()


def test_prompt_logprobs_are_computed_where_they_are_answered(fleet, single):
    """echo with logprobs scores the prompt: never split (the decode worker would not compute it)."""
    prompt = "the prompt to score " * 6
    before = {d: fleet.metric(fleet.url, "tandem_router_pd_decisions_total", f'decision="{d}"')
              for d in ("split", "local")}
    got = fleet.client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                          temperature=0)
    ref = single.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert got.choices[0].logprobs.token_logprobs[0] is None
    assert got.choices[0].logprobs.token_logprobs[1:] == pytest.approx(ref.choices[0].logprobs.token_logprobs[1:],
                                                                       abs=1e-4)
    assert fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"') == before["split"]
    fleet.wait_idle()


def test_tool_calls_are_split_and_equal_a_single_server(fleet, single):
    """The router renders tools and earlier tool calls as the workers do, so the split's prompt is
    the one the decode worker computes; a named tool choice's call equals a single server's."""
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}
    chat = [{"role": "user", "content": "pick one"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "pick", "arguments": '{"n": 3}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "again"}]
    choice = {"type": "function", "function": {"name": "pick"}}
    splits = fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"')
    got, ref = (c.chat.completions.create(model="tiny", messages=chat, tools=[tool], tool_choice=choice,  # type: ignore[arg-type]
                                          max_tokens=20, temperature=0) for c in (fleet.client, single))
    assert got.choices[0].message.tool_calls[0].function.arguments == \
        ref.choices[0].message.tool_calls[0].function.arguments
    assert fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="split"') == splits + 1
    fleet.wait_idle()


def test_prefix_cached_on_the_decode_worker_is_not_sent_again(fleet, single):
    base = "def parse(line):\n    fields = line.split(',')\n" * 8  # well over a few blocks
    assert _text(fleet.client, base, 4) == _text(single, base, 4)
    sent = fleet.metric(fleet.decode, "tandem:kv_transfer_bytes_total")
    longer = base + "    return fields\n"
    assert _text(fleet.client, longer, 8) == _text(single, longer, 8)
    delta = fleet.metric(fleet.decode, "tandem:kv_transfer_bytes_total") - sent
    assert sent > 0
    usage = fleet.client.completions.create(model="tiny", prompt=longer + "#", max_tokens=1, temperature=0).usage
    assert usage.prompt_tokens_details.cached_tokens > 0  # the decode worker holds the prefix
    first_len = len(httpx.post(f"{fleet.decode}/tokenize", json={"prompt": base}).json()["tokens"])
    assert delta < first_len * fleet.metric(fleet.url, "tandem_router_pd_kv_bytes_per_token") / 2
    fleet.wait_idle()


def test_forged_ticket_through_the_router_is_refused(fleet):
    r = httpx.post(f"{fleet.url}/v1/completions", json={
        "model": "tiny", "prompt": "hello", "max_tokens": 2,
        "kv_transfer_params": {"do_remote_prefill": True, "engine": "tcp://127.0.0.1:1", "lease_id": "x",
                               "block_ids": [0], "num_tokens": 1, "block_size": 16, "compat": "x", "prompt": "x",
                               "lease_s": 1.0, "kv_bytes_per_token": 1, "mac": "00"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
    fleet.wait_idle()


def test_a_router_without_kv_events_splits_a_fresh_prompt(fleet, model_dirs):
    """Issue 17, item 10, through the router's request path: a hand-started router over the same
    workers, without their KV events, knows what they cache only from its own routing. A fresh
    prompt must be split: were it recorded on the decode worker before the P/D decision, only
    its last partial block (under 16 tokens, below the threshold of 32) would look uncached."""
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "tandem.cli", "router", "--port", str(port), "--tokenizer",
                               str(model_dirs["llama3-gqa"]), "--pd-threshold", "32", "--seed", "0",
                               "--worker", f"{fleet.prefill},role=prefill", "--worker", f"{fleet.decode},role=decode"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, router)
        transfers = fleet.metric(fleet.decode, "tandem:kv_transfers_total")
        prompt = f"{uuid.uuid4().hex}: nobody sent this prompt before, " * 4  # about 100 tokens
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text[:500]
        assert r.json()["usage"]["prompt_tokens"] >= 64
        assert fleet.metric(url, "tandem_router_pd_decisions_total", 'decision="split"') == 1
        assert fleet.metric(url, "tandem_router_pd_decisions_total", 'decision="local"') == 0
        assert fleet.metric(fleet.decode, "tandem:kv_transfers_total") == transfers + 1
    finally:
        stop_server(router)
    fleet.wait_idle()


def test_clients_gone_at_any_point_of_a_concurrent_split_leave_both_workers_idle(fleet):
    """Streams dropped right away (decode leg parked, prefill queued or computing) and after a
    few tokens (decoding): every request ends, every lease is released, no block stays in use."""
    _text(fleet.client, "import sys\n" * 20, 2)  # a completed split teaches the router the KV endpoint
    concurrent = fleet.metric(fleet.url, "tandem_router_pd_concurrent_splits_total")
    body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client() as client:
        for i, keep in enumerate((0, 0, 1, 3)):  # 0: gone before the first byte (a 5 ms read timeout)
            prompt = f"drop {i}: " + "def handler(event, context):\n    return event\n" * 6
            timeout = httpx.Timeout(30, read=0.005 if keep == 0 else 30)
            try:
                with client.stream("POST", f"{fleet.url}/v1/completions", json={**body, "prompt": prompt},
                                   timeout=timeout) as r:
                    events = 0
                    for line in r.iter_lines():
                        events += line.startswith("data: {")
                        if events >= keep:
                            break  # leaving the block closes the connection mid-stream
            except httpx.ReadTimeout:
                assert keep == 0
    fleet.wait_idle()
    assert fleet.metric(fleet.url, "tandem_router_pd_concurrent_splits_total") >= concurrent + 4
    assert fleet.metric(fleet.prefill, "tandem:kv_leases_expired_total") == 0


def test_prefill_worker_killed_requests_still_complete_locally(model_dirs, single):
    fleet = Fleet(model_dirs["llama3-gqa"], "--pd-threshold", "1")
    try:
        prompt = "for i in range(10):\n    print(i)\n" * 6
        assert _text(fleet.client, prompt, 8) == _text(single, prompt, 8)
        port = int(fleet.prefill.rsplit(":", 1)[1])
        pids = subprocess.run(["pgrep", "-f", "--", f"--port {port} --role prefill"], capture_output=True,
                              text=True).stdout.split()
        assert pids
        for pid in pids:
            subprocess.run(["kill", "-9", pid])
        other = "while True:\n    pass\n" * 7
        assert _text(fleet.client, other, 8) == _text(single, other, 8)  # fell back to a local prefill
        assert fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="fallback"') \
            + fleet.metric(fleet.url, "tandem_router_pd_decisions_total", 'decision="local"') >= 1
        fleet.wait_idle(fleet.decode)
    finally:
        fleet.proc.send_signal(signal.SIGTERM)
        fleet.proc.wait(60)


def test_workers_with_different_secrets_are_never_split_across(model_dirs, single):
    """A prefill and a decode worker whose $TANDEM_KV_TRANSFER_SECRET differ cannot redeem each
    other's tickets: that is the fleet's misconfiguration, not the client's fault. The router sees
    their key fingerprints differ, prefills locally, logs it and counts it; the client gets its answer."""
    from tests.helpers import wait_until

    model = model_dirs["llama3-gqa"]
    prefill, p_url = start_server(model, "--role", "prefill", env={"TANDEM_KV_TRANSFER_SECRET": "a" * 64})
    decode, d_url = start_server(model, "--role", "decode", env={"TANDEM_KV_TRANSFER_SECRET": "b" * 64})
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "tandem.cli", "router", "--port", str(port), "--tokenizer",
                               str(model), "--pd-threshold", "1", "--worker", f"{p_url},role=prefill",
                               "--worker", f"{d_url},role=decode"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, router)
        wait_until(lambda: "tandem_router_requests_in_flight" in httpx.get(f"{url}/metrics").text, 10)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        prompt = "def handler(event, context):\n    return event\n" * 4
        assert _text(client, prompt, 8) == _text(single, prompt, 8)
        text = httpx.get(f"{url}/metrics").text
        assert metric_sum(text, "tandem_router_pd_key_mismatches_total") >= 1
        assert metric_sum(text, "tandem_router_pd_decisions_total", 'decision="split"') == 0
    finally:
        router.send_signal(signal.SIGTERM)
        out, _ = router.communicate(timeout=30)
        stop_server(prefill)
        stop_server(decode)
    assert "different $TANDEM_KV_TRANSFER_SECRET" in out
