"""Issue 17, the router's part: nothing a client sends takes a worker (or the router) down.

Fleets here are real processes over real HTTP: fake workers (a small Starlette app, run by this
file as ``python tests/fleet/test_router_hardening.py worker PORT [MODE]``, which can crash, fail or be
busy on demand and counts what it received) behind a real router (``... router PORT KWARGS
ROUTER_ARGS``: tandem's own build_router + serve_router, with serve_router's keyword arguments
such as api_key and timeouts given as JSON). The P/D record-after-decide rule is a unit test."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

if __name__ != "__main__":  # the fake worker and router processes run this file: they need no engine
    from tests.helpers import free_port, wait_until

MODEL = "tiny"
ROUTER_IDLE_DEADLINE_S = 20


# --------------------------------------------------------------------------- processes
def _fake_worker_main(port: int, mode: str) -> None:
    """A worker that answers by the prompt's words: crash (the process exits mid-request),
    fail500, bad (400); mode busy answers 503 + Retry-After to every request."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    seen: list[str] = []

    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)[:200]
        seen.append(text[:200])
        if mode == "busy":
            return JSONResponse(_err("busy", "ServiceUnavailableError"), 503, headers={"Retry-After": "1"})
        if "crash" in text:
            os._exit(1)
        if "fail500" in text:
            return JSONResponse(_err("boom", "InternalServerError"), 500)
        if "bad" in text:
            return JSONResponse(_err("bad request", "invalid_request_error"), 400)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                             "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def seen_route(_: Request):
        return JSONResponse(seen)

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", completions, methods=["POST"]),
              Route("/seen", seen_route), Route("/v1/models", models),
              Route("/health", lambda _: PlainTextResponse("")), Route("/metrics", lambda _: PlainTextResponse(""))]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


def _router_main(port: int, kwargs: dict, router_args: list[str]) -> None:
    import argparse
    import asyncio

    from tandem.router.app import serve_router
    from tandem.router.launch import add_router_args, build_router

    args = add_router_args(argparse.ArgumentParser()).parse_args(["--port", str(port), *router_args])
    router, subscribers = build_router(args.worker, args, None)
    asyncio.run(serve_router(router, args.host, args.port, subscribers, **kwargs))


def _err(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def _spawn(*argv: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


class Fleet:
    def __init__(self, router: str, port: int, workers: list[str], procs: list[subprocess.Popen]) -> None:
        self.url, self.port, self.workers, self.procs = router, port, workers, procs

    def seen(self, worker: str) -> list[str]:
        return httpx.get(f"{worker}/seen", timeout=5).json()

    def post(self, body, path: str = "/v1/completions", **kw) -> httpx.Response:
        kw.setdefault("timeout", 30)
        if isinstance(body, bytes):
            return httpx.post(self.url + path, content=body, **kw)
        return httpx.post(self.url + path, json=body, **kw)


@contextlib.contextmanager
def _fleet(modes=("ok", "ok"), router_kwargs: dict | None = None, router_args: tuple = (),
           roles: tuple | None = None) -> Iterator[Fleet]:
    """Fake workers (one per mode, with the given roles) and a router in front; on exit the router
    must have nothing in flight, and every process is stopped."""
    procs: list[subprocess.Popen] = []
    try:
        workers = []
        for mode in modes:
            port = free_port()
            procs.append(_spawn("worker", str(port), mode))
            workers.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(workers, procs):
            _wait_healthy(url, proc)
        port = free_port()
        procs.append(_spawn("router", str(port), json.dumps(router_kwargs or {}), "--policy", "round-robin",
                            "--seed", "0", *router_args,
                            *[a for w, role in zip(workers, roles or ["both"] * len(workers))
                              for a in ("--worker", f"{w},role={role}")]))
        fleet = Fleet(f"http://127.0.0.1:{port}", port, workers, procs[:-1])
        _wait_healthy(fleet.url, procs[-1])  # the router serves once its pool has checked every worker
        yield fleet
        _assert_router_idle(fleet)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def make_fleet() -> Iterator[Callable[..., Fleet]]:
    with contextlib.ExitStack() as stack:
        yield lambda *a, **kw: stack.enter_context(_fleet(*a, **kw))


@pytest.fixture(scope="module")
def tokenizer_dir(model_dirs) -> str:
    return str(model_dirs["llama3-gqa"])


@pytest.fixture(scope="module")
def _shared(tokenizer_dir) -> Iterator[Fleet]:
    with _fleet(modes=("ok",), router_args=("--tokenizer", tokenizer_dir)) as fleet:
        yield fleet


@pytest.fixture
def fleet1(_shared) -> Iterator[Fleet]:
    """One fake worker behind a router with the test model's tokenizer, shared by the module's
    tests; each test ends with nothing in flight."""
    yield _shared
    _assert_router_idle(_shared)


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _assert_router_idle(fleet: Fleet) -> None:
    """Every request the router accepted has ended: its in-flight gauge is back to 0."""
    deadline = time.monotonic() + ROUTER_IDLE_DEADLINE_S
    while (n := metric_sum(httpx.get(f"{fleet.url}/metrics", timeout=5).text,
                            "tandem_router_requests_in_flight")) != 0:
        assert time.monotonic() < deadline, f"router still counts {n} in flight"
        time.sleep(0.1)


def _openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- raw sockets
def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until_closed(s: socket.socket, deadline_s: float) -> bytes:
    """Everything the server sends until it closes the connection; fails after deadline_s."""
    s.settimeout(0.2)
    data, deadline = b"", time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after {deadline_s} s; got {data[:300]!r}")


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return status, json.loads(body)


# --------------------------------------------------------------------------- 1. no retry of a crashing request
def test_a_request_that_kills_its_worker_is_not_sent_to_another(make_fleet):
    fleet = make_fleet()
    r = fleet.post({"model": MODEL, "prompt": "crash please", "max_tokens": 1})
    _openai_error(r, 502, "worker_failed")
    # the router may see the connection drop a moment before the dead process can be reaped
    wait_until(lambda: any(p.poll() is not None for p in fleet.procs), timeout_s=10, what="the crashed worker exits")
    survivors = [w for w, p in zip(fleet.workers, fleet.procs) if p.poll() is None]
    assert len(survivors) == 1, "exactly the worker that got the request died"
    assert not any("crash" in s for s in fleet.seen(survivors[0]))
    assert fleet.post({"model": MODEL, "prompt": "still fine", "max_tokens": 1}).status_code == 200


def test_a_500_is_answered_502_once_and_a_4xx_passes_through_unretried(make_fleet):
    fleet = make_fleet()
    _openai_error(fleet.post({"model": MODEL, "prompt": "fail500", "max_tokens": 1}), 502, "worker_failed")
    bad = fleet.post({"model": MODEL, "prompt": "bad", "max_tokens": 1})
    assert bad.status_code == 400 and bad.json() == _err("bad request", "invalid_request_error")
    seen = [s for w in fleet.workers for s in fleet.seen(w)]
    assert seen.count("fail500") == 1 and seen.count("bad") == 1, seen


def test_an_overloaded_worker_503_with_retry_after_is_retried_elsewhere(make_fleet):
    fleet = make_fleet(modes=("busy", "ok"))
    for i in range(4):  # round robin: half land on the busy worker first
        assert fleet.post({"model": MODEL, "prompt": f"p{i}", "max_tokens": 1}).status_code == 200
    assert len(fleet.seen(fleet.workers[0])) >= 1 and len(fleet.seen(fleet.workers[1])) == 4


def test_a_prefill_leg_that_kills_its_worker_is_not_run_on_the_decode_worker(make_fleet, tokenizer_dir):
    fleet = make_fleet(roles=("prefill", "decode"),
                       router_args=("--tokenizer", tokenizer_dir, "--pd-threshold", "1", "--no-pd-concurrent"))
    decode = fleet.workers[1]
    r = fleet.post({"model": MODEL, "prompt": "crash " * 40, "max_tokens": 1})
    _openai_error(r, 502, "worker_failed")
    assert fleet.procs[0].poll() is not None and fleet.procs[1].poll() is None
    assert fleet.seen(decode) == []
    # the prefill worker is gone: prompts are prefilled on the decode worker again
    assert fleet.post({"model": MODEL, "prompt": "fine " * 40, "max_tokens": 1}).status_code == 200


# --------------------------------------------------------------------------- 2. token ids, types, no model
@pytest.mark.parametrize("prompt", [[2**70] * 32, [[2**70] * 32], [-1] * 32, [[-5]], [True] * 32, [1.5] * 32,
                                    [[1, 2], [3.0]], [1, "a"], {"a": 1}, 7, [None], [[[1]]]])
def test_prompts_that_cannot_be_token_ids_are_400(fleet1, prompt):
    fleet = fleet1
    err = _openai_error(fleet.post({"model": MODEL, "prompt": prompt, "max_tokens": 1}), 400)
    assert err["type"] == "invalid_request_error"


def test_out_of_vocabulary_ids_are_judged_by_a_real_worker(fleet):
    """Ids that may be token ids pass the router; a real worker answers 400 for its vocabulary."""
    url, _, _ = fleet
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [2**31 - 1] * 32, "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 400 and "error" in r.json(), r.text
    for prompt in ([2**70] * 32, [[2**70] * 32], [-1] * 32):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and "error" in r.json(), r.text


@pytest.mark.parametrize("body", [[1, 2], "just a string", 3, None])
def test_a_body_that_is_not_an_object_is_400(fleet1, body):
    _openai_error(fleet1.post(json.dumps(body).encode()), 400)


@pytest.mark.parametrize("messages", ["hi", [1, 2], [{"role": "user", "content": 5}], {"role": "user"}, None])
def test_messages_of_the_wrong_type_are_400(fleet1, messages):
    _openai_error(fleet1.post({"model": MODEL, "messages": messages}, "/v1/chat/completions"), 400)


def test_in_range_ids_and_a_request_without_model_are_routed(fleet1):
    fleet = fleet1
    assert fleet.post({"model": MODEL, "prompt": [2**31 - 1] * 32, "max_tokens": 1}).status_code == 200
    assert fleet.post({"prompt": "no model named", "max_tokens": 1}).status_code == 200
    chat = fleet.post({"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert chat.status_code == 200


# --------------------------------------------------------------------------- 3. bounded, streaming body limit
def test_a_content_length_over_the_limit_is_413_before_the_body(make_fleet):
    fleet = make_fleet(modes=("ok",))
    with _connect(fleet.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 300000000\r\n\r\n{\"prompt\": \"")
        status, body = _status_and_json(_read_until_closed(s, 10))
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(make_fleet):
    fleet = make_fleet(modes=("ok",))
    chunk = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, answer = 0, b""
    with _connect(fleet.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.setblocking(False)
        while sent < 64 * 2**20:  # 64 MiB: far past the limit; a router that buffers never answers before the end
            readable, writable, _ = select.select([s], [s], [], 10)
            assert readable or writable, "router neither reads nor answers"
            if readable:
                try:
                    answer = s.recv(65536)
                except ConnectionResetError:
                    pass
                break
            try:
                sent += s.send(frame)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                continue
        s.setblocking(True)
        answer += _read_until_closed(s, 10) if answer else b""
    assert answer, f"no answer after {sent} bytes"
    status, body = _status_and_json(answer)
    assert status == 413 and "error" in body
    assert sent < 32 * 2**20, f"the router read {sent} bytes before refusing"


# --------------------------------------------------------------------------- 4. tokenize off the event loop
def test_a_huge_prompt_does_not_stall_health(fleet1):
    fleet = fleet1
    words = ["alpha", "beta", "gamma", "delta", "omega", "zeta"]
    prompt = " ".join(random.Random(0).choice(words) for _ in range(600_000))[:3_500_000]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(fleet.post, {"model": MODEL, "prompt": prompt, "max_tokens": 1}, timeout=120)
        probes = 0
        while not big.done():
            # generous bound: an idle router answers in milliseconds; a stalled loop takes seconds
            assert httpx.get(f"{fleet.url}/health", timeout=1.0).status_code == 200
            probes += 1
        assert big.result().status_code == 200
    assert probes >= 1


# --------------------------------------------------------------------------- 5. authenticate before tokenizing
def test_the_api_key_is_checked_before_the_body(make_fleet, tokenizer_dir):
    fleet = make_fleet(modes=("ok",), router_kwargs={"api_key": "sekret"}, router_args=("--tokenizer", tokenizer_dir))
    big = {"model": MODEL, "prompt": "x " * 2_000_000, "max_tokens": 1}
    err = _openai_error(fleet.post(big), 401)
    assert err["type"] == "authentication_error"
    _openai_error(fleet.post(big, headers={"Authorization": "Bearer wrong"}), 401)
    _openai_error(httpx.get(f"{fleet.url}/v1/models"), 401)
    assert fleet.seen(fleet.workers[0]) == []
    assert httpx.get(f"{fleet.url}/health").status_code == 200
    assert httpx.get(f"{fleet.url}/metrics").status_code == 200
    ok = fleet.post({"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


# --------------------------------------------------------------------------- 6. P/D: decide first, record after
def test_the_pd_decider_sees_the_index_as_it_was_before_the_request():
    from tandem.router.app import Router, RouterMetrics
    from tandem.router.index import ApproxPrefixIndex, prompt_block_hashes
    from tandem.router.pd import PDCosts, PDDecider
    from tandem.router.policy import build_policy
    from tandem.router.types import RouteRequest
    from tandem.router.workers import WorkerPool, WorkerSpec

    pool = WorkerPool([WorkerSpec("http://p", role="prefill"), WorkerSpec("http://d", role="decode")])
    for w in pool.workers.values():
        w.healthy = True
    approx = ApproxPrefixIndex()
    router = Router(pool, build_policy("cache-aware", approx, rng=random.Random(0)), None, 16, approx, approx,
                    RouterMetrics(), "cache-aware", PDDecider(PDCosts(), 16, threshold=64))
    ids = list(range(200))
    req = RouteRequest("m", ids, prompt_block_hashes(ids, 16))
    routed = router.pick(req, set(), record=False)
    assert routed.worker.url == "http://d" and routed.predicted_blocks == 0
    assert router.plan_split(routed).split  # uncached on d: nothing recorded yet
    router.record(routed)
    router.release(routed)
    again = router.pick(req, set(), record=False)
    assert again.predicted_blocks == 12 and not router.plan_split(again).split  # now d has it
    router.release(again)
    assert all(w.in_flight == 0 and w.pending_prefill_tokens == 0 for w in pool.workers.values())


# --------------------------------------------------------------------------- 7. slow and idle clients
TIMEOUTS = {"head_timeout_s": 1.0, "body_timeout_s": 2.0, "keep_alive_timeout_s": 1.0}


def test_idle_slow_head_and_slow_body_connections_are_closed(make_fleet):
    fleet = make_fleet(modes=("ok",), router_kwargs=TIMEOUTS)
    idle = _connect(fleet.port)
    slow_head = _connect(fleet.port)
    slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    slow_body = _connect(fleet.port)
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    try:
        assert _read_until_closed(idle, 6) == b""
        for _ in range(4):  # one header byte at a time does not keep a head alive forever
            try:
                slow_head.sendall(b"X")
            except OSError:
                break
            time.sleep(0.3)
        _read_until_closed(slow_head, 6)
        status, body = _status_and_json(_read_until_closed(slow_body, 8))
        assert status == 408 and body["error"]["type"] == "invalid_request_error"
    finally:
        for s in (idle, slow_head, slow_body):
            s.close()


def test_an_idle_keep_alive_connection_is_closed(make_fleet):
    fleet = make_fleet(modes=("ok",), router_kwargs=TIMEOUTS)
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    with _connect(fleet.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = _read_until_closed(s, 8)
    assert raw.startswith(b"HTTP/1.1 200")


# --------------------------------------------------------------------------- 8, 9. unparseable bodies, unknown routes
@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "\xff\xfe"}', b"{not json", b""])
def test_unparseable_bodies_are_400_in_openai_shape(fleet1, raw):
    _openai_error(fleet1.post(raw, headers={"Content-Type": "application/json"}), 400)


def test_unknown_routes_are_404_in_openai_shape(fleet1):
    fleet = fleet1
    _openai_error(httpx.get(f"{fleet.url}/v1/nope"), 404)
    err = _openai_error(httpx.get(f"{fleet.url}/v1/completions"), 405)
    assert err["type"] == "invalid_request_error"


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _fake_worker_main(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ok")
    elif sys.argv[1] == "router":
        _router_main(int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:])
