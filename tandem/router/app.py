"""`tandem router`: an OpenAI-compatible front over a pool of workers.

Per request: parse the body, tokenize the prompt (local tokenizer; chat through its template),
hash its full blocks as the engine does, let the policy pick a worker among the healthy ones,
and pass the worker's response through unchanged (streaming bytes as they arrive). A request
that fails before its first byte (connection error, 5xx) is retried once on another worker;
after the first byte the client sees the worker's stream as is. Every request the router sends
is released exactly once (in_flight and the policy's per-prefix counts go back down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tandem.kv_transfer.ticket import Ticket, prompt_hash, sign
from tandem.router.index import ApproxPrefixIndex, prompt_block_hashes
from tandem.router.pd import PDDecider
from tandem.router.policy import PrefixMatcher
from tandem.router.types import RouteRequest, WorkerState
from tandem.router.workers import WorkerPool

logger = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
MAX_BODY_BYTES = 4 * 2**20


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_router_requests", "Requests routed, by worker and decision",
                                ["worker", "decision"], registry=self.registry)
        self.retries = Counter("tandem_router_retries", "Requests retried on another worker before their first byte",
                               registry=self.registry)
        self.failures = Counter("tandem_router_failures", "Requests that failed on every worker tried",
                                registry=self.registry)
        self.routing_latency = Histogram("tandem_router_routing_latency_seconds",
                                         "Time to tokenize, hash and pick a worker",
                                         buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1),
                                         registry=self.registry)
        self.predicted_cached = Counter("tandem_router_predicted_cached_tokens",
                                        "Prompt tokens the router expected the chosen worker to have cached",
                                        registry=self.registry)
        self.reported_cached = Counter("tandem_router_reported_cached_tokens",
                                       "Prompt tokens the workers reported cached (usage.prompt_tokens_details)",
                                       registry=self.registry)
        self.prompt_tokens = Counter("tandem_router_prompt_tokens", "Prompt tokens routed (per usage)",
                                     registry=self.registry)
        self.pd_decisions = Counter("tandem_router_pd_decisions", "P/D decider: split (remote prefill + KV transfer), "
                                    "local (prefill on the decode worker), fallback (prefill leg failed: local)",
                                    ["decision"], registry=self.registry)
        self.pd_concurrent = Counter("tandem_router_pd_concurrent_splits", "Splits whose decode leg was sent with "
                                     "a pending ticket while the prefill leg ran", registry=self.registry)
        self.pd_prefill_seconds = Histogram("tandem_router_pd_prefill_seconds", "Wall time of a prefill leg",
                                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                            registry=self.registry)

    def watch_workers(self, pool: WorkerPool) -> None:
        gauge = Gauge("tandem_router_requests_in_flight", "Requests (and prefill legs) sent to a worker and not yet "
                      "ended, as the router counts them", ["worker"], registry=self.registry)
        for url, worker in pool.workers.items():
            gauge.labels(url).set_function(lambda w=worker: w.in_flight)

    def watch_pd_costs(self, decider: PDDecider) -> None:
        for name, doc, attr in [
            ("tandem_router_pd_prefill_seconds_per_token", "Learned prefill cost per uncached token",
             "prefill_s_per_token"),
            ("tandem_router_pd_kv_bytes_per_token", "KV bytes per token (from the workers' tickets)",
             "kv_bytes_per_token"),
        ]:
            Gauge(name, doc, registry=self.registry).set_function(lambda a=attr: getattr(decider.costs, a))


@dataclass
class Routed:
    worker: WorkerState
    req: RouteRequest
    predicted_blocks: int
    prefill_tokens: int  # counted in worker.pending_prefill_tokens until the first byte comes back


class Router:
    """Holds the pool, the indexes and the policy; `route` picks, `release` undoes the accounting."""

    def __init__(self, pool: WorkerPool, policy, tokenizer, block_size: int, matcher: PrefixMatcher,
                 approx: ApproxPrefixIndex, metrics: RouterMetrics, decision: str,
                 pd: PDDecider | None = None, kv_secret: bytes | None = None, pd_concurrent: bool = True) -> None:
        self.pool, self.policy, self.tokenizer = pool, policy, tokenizer
        self.pd = pd  # set when some worker has role prefill: disaggregated serving
        self.kv_secret, self.pd_concurrent = kv_secret, pd_concurrent  # signs pending tickets (concurrent legs)
        self._tasks: set[asyncio.Task] = set()
        metrics.watch_workers(pool)
        if pd is not None:
            metrics.watch_pd_costs(pd)
        self.block_size, self.matcher, self.approx = block_size, matcher, approx
        self.metrics, self.decision = metrics, decision

    def route_request(self, body: dict, chat: bool, session: str | None) -> RouteRequest:
        ids = self._token_ids(body, chat)
        return RouteRequest(str(body.get("model", "")), ids, prompt_block_hashes(ids, self.block_size), session)

    def _token_ids(self, body: dict, chat: bool) -> list[int]:
        if self.tokenizer is None:
            return []
        try:
            if chat:
                msgs = [{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str)
                         else "".join(p.get("text", "") for p in m.get("content") or [])}
                        for m in body.get("messages") or []]
                return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                return prompt
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            return self.tokenizer.encode(prompt or "") if isinstance(prompt, str) else []
        except Exception:  # noqa: BLE001 - a prompt we cannot parse is routed by load; the worker judges it
            return []

    def pick(self, req: RouteRequest, exclude: set[str]) -> Routed | None:
        candidates = [w for w in self.pool.healthy() if w.url not in exclude and (self.pd is None or w.decodes)]
        worker = self.policy.pick(req, candidates)
        if worker is None:
            return None
        return self._account(worker, req)  # the policy recorded the pick itself (session, per-prefix counts)

    def pick_prefill(self, worker: WorkerState, req: RouteRequest) -> Routed:
        """Account a prefill leg on ``worker`` (outside the policy: no session or prefix counts)."""
        return self._account(worker, req)

    def _account(self, worker: WorkerState, req: RouteRequest) -> Routed:
        """Count the request on the worker: in flight, its uncached prompt as pending prefill, and
        its prefix in the routing history."""
        predicted = self._matched_blocks(req).get(worker.url, 0)
        prefill = max(0, len(req.token_ids) - predicted * self.block_size)
        worker.in_flight += 1
        worker.pending_prefill_tokens += prefill
        if req.block_hashes:
            self.approx.record(worker.url, req.block_hashes)
        return Routed(worker, req, predicted, prefill)

    def release_prefill(self, routed: Routed) -> None:
        self.first_byte(routed)
        routed.worker.in_flight -= 1

    def pending_ticket(self, prefill: WorkerState, token_ids: list[int]) -> dict | None:
        """A signed pending ticket for a lease this router names on ``prefill``, or None when
        concurrent legs are off, the secret is unknown here, or the worker has issued no ticket yet."""
        t = prefill.kv_ticket
        if not (self.kv_secret and self.pd_concurrent and t):
            return None
        try:
            ticket = Ticket(True, t["engine"], secrets.token_hex(16), [], len(token_ids), t["block_size"],
                            t["compat"], prompt_hash(token_ids), t["lease_s"], t["kv_bytes_per_token"], pending=True)
        except (TypeError, KeyError):
            return None
        return msgspec.to_builtins(sign(ticket, self.kv_secret))

    def spawn(self, coro) -> None:
        """Run a background task, holding a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def count_prefill(routed: Routed, tokens: int) -> None:
        """Count ``tokens`` of prompt as pending on the routed worker again (undone by first_byte)."""
        routed.worker.pending_prefill_tokens += tokens
        routed.prefill_tokens += tokens

    @staticmethod
    def first_byte(routed: Routed) -> None:
        """The worker has answered (its prefill is done): its pending prefill no longer counts.
        Idempotent."""
        routed.worker.pending_prefill_tokens -= routed.prefill_tokens
        routed.prefill_tokens = 0

    def _matched_blocks(self, req: RouteRequest) -> dict[str, int]:
        if not req.block_hashes:
            return {}
        return self.matcher.match_blocks(req.block_hashes)

    def release(self, routed: Routed) -> None:
        self.first_byte(routed)
        routed.worker.in_flight -= 1
        self.policy.release(routed.req, routed.worker)

    def observe_usage(self, routed: Routed, usage: dict | None) -> None:
        if not usage:
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.reported_cached.inc(cached)
        self.metrics.predicted_cached.inc(min(prompt, routed.predicted_blocks * self.block_size))


def _usage_from_sse(buffer: bytes) -> dict | None:
    """The last `usage` object in an SSE byte stream, if any."""
    usage = None
    for line in buffer.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                usage = json.loads(line[6:]).get("usage") or usage
            except ValueError:
                pass
    return usage


def build_router_app(router: Router, http: httpx.AsyncClient) -> FastAPI:
    app = FastAPI(title="tandem router")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if router.pool.healthy() else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        names = sorted({m for w in router.pool.healthy() for m in w.models})
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tandem"}
                                           for n in names]}

    async def forward(raw: Request, path: str, chat: bool):
        body_bytes = await raw.body()
        if len(body_bytes) > MAX_BODY_BYTES:
            return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(body_bytes)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return _error(400, "request body must be a JSON object")
        started = time.perf_counter()
        req = router.route_request(body, chat, raw.headers.get(SESSION_HEADER))
        headers = {k: v for k, v in raw.headers.items() if k.lower() in ("authorization", "content-type")}
        tried: set[str] = set()
        for attempt in range(2):
            routed = router.pick(req, tried)
            if routed is None:
                break
            if attempt == 0:
                router.metrics.routing_latency.observe(time.perf_counter() - started)
            tried.add(routed.worker.url)
            if attempt == 0 and router.pd is not None and _splittable(body, req):
                split_body = await _maybe_split(router, http, routed, path, body, headers)
                body_bytes = split_body or body_bytes
            response = await _send(router, http, routed, path, body_bytes, headers, bool(body.get("stream")))
            if response is not None:
                router.metrics.requests.labels(routed.worker.url, router.decision).inc()
                return response
            router.metrics.retries.inc()
        router.metrics.failures.inc()
        return _error(503, "no healthy worker could take the request", "ServiceUnavailableError", "no_worker")

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await forward(raw, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await forward(raw, "/v1/chat/completions", chat=True)

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        return await forward(raw, "/tokenize", chat=False)

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        return await forward(raw, "/detokenize", chat=False)

    return app


async def _send(router: Router, http: httpx.AsyncClient, routed: Routed, path: str, body: bytes,
                headers: dict, stream: bool) -> Response | None:
    """The worker's response, or None when it failed before its first byte (the caller retries)."""
    url = routed.worker.url + path
    try:
        upstream = await http.send(http.build_request("POST", url, content=body, headers=headers), stream=True)
    except httpx.HTTPError:
        router.pool.report_failure(routed.worker.url)
        router.release(routed)
        return None
    if upstream.status_code >= 500 and upstream.status_code != 502:  # 502: a failed KV load, the client's answer
        await upstream.aclose()
        router.pool.report_failure(routed.worker.url)
        router.release(routed)
        return None
    router.pool.report_success(routed.worker.url)
    passthrough = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    if not stream:
        try:
            content = await upstream.aread()
        except httpx.HTTPError:
            router.pool.report_failure(routed.worker.url)
            return None
        finally:
            await upstream.aclose()
            router.release(routed)
        if upstream.status_code == 200:
            try:
                router.observe_usage(routed, json.loads(content).get("usage"))
            except ValueError:
                pass
        return Response(content, status_code=upstream.status_code, headers=passthrough)
    return StreamingResponse(_relay(router, routed, upstream), status_code=upstream.status_code,
                             headers=passthrough)


def _splittable(body: dict, req: RouteRequest) -> bool:
    """One prompt, one choice, tokenized here, and not already part of a hand-off."""
    prompt = body.get("prompt")
    single = "messages" in body or isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                              and isinstance(prompt[0], int))
    return bool(single and req.token_ids and body.get("n", 1) in (1, None) and "kv_transfer_params" not in body)


_PREFILL_LEG_TIMEOUT = httpx.Timeout(120.0, connect=2.0)
PENDING_TICKET_FIELDS = ("engine", "compat", "block_size", "lease_s", "kv_bytes_per_token")


async def _maybe_split(router: Router, http: httpx.AsyncClient, routed: Routed, path: str, body: dict,
                       headers: dict) -> bytes | None:
    """Ask the P/D decider; on a split, return the decode leg's body with its ticket: a pending
    one signed here while the prefill leg runs concurrently (when the router has the fleet's
    secret and knows the prefill worker's KV endpoint from an earlier ticket), else the prefill
    worker's own after its leg. None: prefill locally (decided so, or the prefill leg failed)."""
    prefills = [w for w in router.pool.healthy() if w.prefills and w.url != routed.worker.url]
    plan = router.pd.plan(len(routed.req.token_ids), routed.worker, prefills, router._matched_blocks(routed.req),
                          routed.prefill_tokens)
    if not plan.split:
        router.metrics.pd_decisions.labels("local").inc()
        return None
    # NOTE: from here the decode worker will not prefill this prompt: while the prefill leg runs, its
    # tokens count on the prefill worker only (else every split in flight would make the decode
    # worker look busy, and make the next request split too)
    local_prefill_tokens = routed.prefill_tokens
    router.first_byte(routed)
    prefill_body = {k: v for k, v in body.items() if k != "stream_options"}
    prefill_body.update(max_tokens=1, stream=False)
    pending = router.pending_ticket(plan.prefill, routed.req.token_ids)
    if pending is not None:  # both legs at once: the decode worker pulls as soon as the lease exists
        prefill_body["kv_transfer_params"] = {"do_remote_decode": True, "lease_id": pending["lease_id"]}
        router.spawn(_prefill_leg(router, http, plan.prefill, routed.req, path, prefill_body, headers))
        router.metrics.pd_decisions.labels("split").inc()
        router.metrics.pd_concurrent.inc()
        return json.dumps({**body, "kv_transfer_params": pending}).encode()
    prefill_body["kv_transfer_params"] = {"do_remote_decode": True}
    ticket = await _prefill_leg(router, http, plan.prefill, routed.req, path, prefill_body, headers)
    if ticket is None:
        router.count_prefill(routed, local_prefill_tokens)  # the decode worker prefills it after all
        return None
    router.metrics.pd_decisions.labels("split").inc()
    return json.dumps({**body, "kv_transfer_params": ticket}).encode()


async def _prefill_leg(router: Router, http: httpx.AsyncClient, worker: WorkerState, req: RouteRequest, path: str,
                       body: dict, headers: dict) -> dict | None:
    """POST the prefill leg; learn from it (cost per token, the worker's ticket fields). Returns
    the ticket, or None when the leg failed (counted as a fallback: the decode worker prefills)."""
    leg = router.pick_prefill(worker, req)
    tokens_ahead = worker.pending_prefill_tokens
    started = time.perf_counter()
    ticket = None
    try:
        resp = await http.post(worker.url + path, json=body, headers=headers, timeout=_PREFILL_LEG_TIMEOUT)
        if resp.status_code == 200:
            ticket = resp.json().get("kv_transfer_params")
        elif resp.status_code >= 500:
            router.pool.report_failure(worker.url)
    except (httpx.HTTPError, ValueError):
        router.pool.report_failure(worker.url)
    finally:
        router.release_prefill(leg)
    if not isinstance(ticket, dict):
        router.metrics.pd_decisions.labels("fallback").inc()
        return None
    elapsed = time.perf_counter() - started
    router.metrics.pd_prefill_seconds.observe(elapsed)
    router.pd.observe_prefill(tokens_ahead, elapsed, ticket)
    worker.kv_ticket = {k: ticket.get(k) for k in PENDING_TICKET_FIELDS}
    return ticket


async def _relay(router: Router, routed: Routed, upstream: httpx.Response) -> AsyncIterator[bytes]:
    """Pass the worker's stream through; closing it (client gone) closes the upstream request,
    which makes the worker abort. Keeps only the tail to find the usage chunk."""
    tail = b""
    try:
        async for chunk in upstream.aiter_raw():
            router.first_byte(routed)
            tail = (tail + chunk)[-8192:]
            yield chunk
    except httpx.HTTPError as e:
        router.pool.report_failure(routed.worker.url)
        err = {"error": {"message": f"worker failed mid-stream: {type(e).__name__}", "type": "ServiceUnavailableError",
                         "param": None, "code": "worker_failed"}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        await upstream.aclose()
        router.release(routed)
        router.observe_usage(routed, _usage_from_sse(tail))


async def serve_router(router: Router, host: str, port: int, subscribers: list, on_ready=None) -> int:
    import signal

    import uvicorn

    from tandem.entrypoints.openai.api_server import _Server

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0), limits=limits) as http:
        await router.pool.start()
        tasks = [asyncio.create_task(s.run()) for s in subscribers]
        app = build_router_app(router, http)
        server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", http="h11"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        if on_ready is not None:
            on_ready()
        try:
            await server.serve()
        finally:
            for s in subscribers:
                s.close()
            for t in tasks:
                t.cancel()
            await router.pool.close()
    return 0
