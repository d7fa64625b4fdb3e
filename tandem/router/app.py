"""`tandem router`: an OpenAI-compatible front over a pool of workers.

Per request: parse the body, tokenize the prompt (local tokenizer; chat through its template),
hash its full blocks as the engine does, let the policy pick a worker among the healthy ones,
and pass the worker's response through unchanged (streaming bytes as they arrive). A request is
retried once on another worker only when the first worker cannot have run it: the connection
failed before any byte reached it, or it answered 503 with Retry-After (overloaded). A worker that
dropped the request after receiving it, or answered 500, may have been broken by that very
request: the client gets 502 `worker_failed` and no other worker sees it. 4xx answers pass through
as is. After the first byte the client sees the worker's stream as is. Every request the router
sends is released exactly once (in_flight and the policy's per-prefix counts go back down). A
client that leaves closes its worker request, streaming or not, so the worker aborts it.

What a client sends is bounded before it costs anything (issue 17): the API key (when set) is
checked before the body is read; the body is counted as it arrives (MAX_BODY_BYTES, 413) and must
arrive within BODY_TIMEOUT_S (408); a connection must send a complete request head within
HEAD_TIMEOUT_S; prompts are validated (token ids, types) before hashing, and tokenized off the
event loop, and not at all above ROUTE_TOKENIZE_MAX_CHARS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import astuple, dataclass
from functools import partial
from typing import Any, TypeVar

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tandem.entrypoints.http_protocol import ApiKeyCheck, HTTPTimeouts, uvicorn_kwargs
from tandem.kv_transfer.ticket import Ticket, key_id, prompt_hash, sign
from tandem.router.index import ApproxPrefixIndex, prompt_block_hashes
from tandem.router.pd import PDDecider, PDPlan
from tandem.router.policy import PrefixMatcher
from tandem.router.types import RouteRequest, WorkerState
from tandem.router.workers import WorkerPool
from tandem.tokenizer import chat_token_ids, template_messages

logger = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_HEADER = "x-session-id"
MAX_BODY_BYTES = 4 * 2**20
TOKEN_ID_LIMIT = 2**31  # token ids the router hashes are ints in [0, TOKEN_ID_LIMIT); the worker judges the vocabulary
# Invariant: RouteRequest.token_ids is either the prompt's exact, full tokenization or empty (route
# by load), never a part of it: P/D pending tickets hash the whole prompt. So a prompt longer than
# this many characters is not tokenized here at all (it would cost ~1 s per MB of a CPU core) and
# is routed by load, without prefix affinity and without a P/D split.
ROUTE_TOKENIZE_MAX_CHARS = 131_072
OFF_LOOP_CHARS = 4096  # prompts longer than this are tokenized in a thread, not on the event loop
HEAD_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S = astuple(HTTPTimeouts())  # tandem/entrypoints/http_protocol.py
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key
_CLOSE = {"Connection": "close"}  # the body was not read to its end: the connection cannot be reused


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ClientError(Exception):
    """A request the router refuses itself; ``response`` is its answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.response = _error(status, message, param=param, headers=headers)


def _is_token_id(x: object) -> bool:
    return type(x) is int and 0 <= x < TOKEN_ID_LIMIT  # type(): bools are not token ids


def check_prompt(prompt: object) -> None:
    """Raise ClientError unless ``prompt`` has a shape the workers accept (str, [str], [id],
    [[id]]) with every id a possible token id. Empty or absent prompts are the worker's to judge."""
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise ClientError(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return
    rows = prompt if prompt and isinstance(prompt[0], list) else [prompt]
    if not all(isinstance(r, list) and all(_is_token_id(t) for t in r) for r in rows):
        raise ClientError(400, f"prompt token ids must be integers in [0, {TOKEN_ID_LIMIT})", "prompt")


def check_messages(messages: object) -> None:
    """Raise ClientError unless ``messages`` is a list of objects whose content is a string, a
    list of content parts (objects) or absent."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ClientError(400, "messages must be a list of message objects", "messages")
    for m in messages:
        content = m.get("content")
        if not (content is None or isinstance(content, str)
                or isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise ClientError(400, "message content must be a string or a list of content parts", "messages")


def check_body(body: object, chat: bool) -> dict:
    """The request body as a dict, or ClientError for what no worker could serve."""
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ClientError(400, "model must be a string", "model")
    if chat:
        check_messages(body.get("messages"))
    else:
        check_prompt(body.get("prompt"))
    return body


def prompt_chars(body: dict, chat: bool) -> int:
    """Characters the router would tokenize for routing (call after check_body)."""
    if chat:
        return sum(len(m.get("content")) if isinstance(m.get("content"), str)
                   else sum(len(str(p.get("text", ""))) for p in m.get("content") or [])
                   for m in body.get("messages") or [])
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return len(prompt) if isinstance(prompt, str) else 0


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
                                    "local (prefill on the decode worker), fallback (prefill leg failed: local), "
                                    "failed (the prefill worker failed on the request: 502, not run again)",
                                    ["decision"], registry=self.registry)
        self.pd_concurrent = Counter("tandem_router_pd_concurrent_splits", "Splits whose decode leg was sent with "
                                     "a pending ticket while the prefill leg ran", registry=self.registry)
        self.pd_key_mismatches = Counter("tandem_router_pd_key_mismatches", "Splits not made because the prefill "
                                         "and decode workers publish different KV transfer key fingerprints "
                                         "(a misconfigured fleet)", registry=self.registry)
        self.pd_prefill_seconds = Histogram("tandem_router_pd_prefill_seconds", "Wall time of a prefill leg",
                                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                            registry=self.registry)

    def watch_workers(self, pool: WorkerPool, matcher: PrefixMatcher) -> None:
        in_flight = Gauge("tandem_router_requests_in_flight", "Requests (and prefill legs) sent to a worker and not "
                          "yet ended, as the router counts them", ["worker"], registry=self.registry)
        healthy = Gauge("tandem_router_worker_healthy", "1 while the worker passes its health checks, else 0",
                        ["worker"], registry=self.registry)
        indexed = Gauge("tandem_router_indexed_blocks", "KV blocks the router's prefix index believes the worker "
                        "holds (from its KV events, or approximated from routed prompts)", ["worker"],
                        registry=self.registry)
        for url, worker in pool.workers.items():
            in_flight.labels(url).set_function(partial(_in_flight, worker))
            healthy.labels(url).set_function(partial(_healthy, worker))
            indexed.labels(url).set_function(partial(matcher.num_blocks, url))

    def watch_pd_costs(self, decider: PDDecider) -> None:
        for name, doc, attr in [
            ("tandem_router_pd_prefill_seconds_per_token", "Learned prefill cost per uncached token",
             "prefill_s_per_token"),
            ("tandem_router_pd_kv_bytes_per_token", "KV bytes per token (from the workers' tickets)",
             "kv_bytes_per_token"),
        ]:
            Gauge(name, doc, registry=self.registry).set_function(partial(_cost, decider, attr))


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tandem"}


def _in_flight(worker: WorkerState) -> float:
    return worker.in_flight


def _healthy(worker: WorkerState) -> float:
    return float(worker.healthy)


def _cost(decider: PDDecider, attr: str) -> float:
    return getattr(decider.costs, attr)


@dataclass
class Routed:
    worker: WorkerState
    req: RouteRequest
    predicted_blocks: int  # leading blocks of the prompt the worker holds in any tier
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
        self._key_mismatches: set[tuple[str, str]] = set()  # (prefill, decode) pairs already logged
        metrics.watch_workers(pool, matcher)
        if pd is not None:
            metrics.watch_pd_costs(pd)
        self.block_size, self.matcher, self.approx = block_size, matcher, approx
        self.metrics, self.decision = metrics, decision

    def route_request(self, body: dict, chat: bool, session: str | None) -> RouteRequest:
        """The policy's view of a checked body (check_body). No model: any worker may take it."""
        ids = self._token_ids(body, chat) if prompt_chars(body, chat) <= ROUTE_TOKENIZE_MAX_CHARS else []
        model = body.get("model")
        return RouteRequest(model if isinstance(model, str) else "", ids, prompt_block_hashes(ids, self.block_size),
                            session)

    async def route_request_async(self, body: dict, chat: bool, session: str | None) -> RouteRequest:
        """route_request, in a thread when the prompt is long enough to hold the event loop."""
        if self.tokenizer is not None and prompt_chars(body, chat) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.route_request, body, chat, session)
        return self.route_request(body, chat, session)

    def _token_ids(self, body: dict, chat: bool) -> list[int]:
        """The prompt's token ids (body checked by check_body: ids given are valid token ids)."""
        if self.tokenizer is None:
            return []
        try:
            if chat:
                # the workers' own rendering (tandem/tokenizer.py): P/D tickets hash these exact ids
                return chat_token_ids(self.tokenizer, template_messages(body.get("messages") or []),
                                      body.get("add_generation_prompt", True) is not False, body.get("tools") or None)
            prompt = _single_prompt(body.get("prompt"))
            if isinstance(prompt, list):
                return prompt
            return self.tokenizer.encode(prompt) if prompt else []
        except Exception:  # noqa: BLE001 - a prompt we cannot parse is routed by load; the worker judges it
            return []

    def pick(self, req: RouteRequest, exclude: set[str], *, record: bool = True) -> Routed | None:
        """A worker for ``req``, accounted (release it once). ``record=False`` leaves the prefix out
        of the routing history until ``record``: the P/D decision must see the index as it was."""
        candidates = [w for w in self.pool.healthy() if w.url not in exclude and (self.pd is None or w.decodes)]
        worker = self.policy.pick(req, candidates)
        if worker is None:
            return None
        routed = self._account(worker, req)  # the policy recorded the pick itself (session, per-prefix counts)
        if record:
            self.record(routed)
        return routed

    def serves_model(self, model: str) -> bool:
        """Whether some healthy worker serves ``model`` (or might: a worker whose models are unknown)."""
        return not model or any(not w.models or model in w.models for w in self.pool.healthy())

    def plan_split(self, routed: Routed) -> PDPlan:
        """The P/D decider's plan for a request picked (not yet recorded) on a decode worker."""
        prefills = [w for w in self.pool.healthy() if w.prefills and w.url != routed.worker.url
                    and self.shares_kv_secret(w, routed.worker)]
        assert self.pd is not None  # only a fleet with prefill workers plans splits
        return self.pd.plan(len(routed.req.token_ids), routed.worker, prefills, self._matched_blocks(routed.req),
                            routed.prefill_tokens)

    def record(self, routed: Routed) -> None:
        """Remember that the worker will hold the request's prefix (routing history, for workers
        without KV events)."""
        if routed.req.block_hashes:
            self.approx.record(routed.worker.url, routed.req.block_hashes)

    def pick_prefill(self, worker: WorkerState, req: RouteRequest) -> Routed:
        """Account a prefill leg on ``worker`` (outside the policy: no session or prefix counts)."""
        routed = self._account(worker, req)
        self.record(routed)
        return routed

    def _account(self, worker: WorkerState, req: RouteRequest) -> Routed:
        """Count the request on the worker: in flight, and its uncached prompt as pending prefill
        (prompt tokens - weighted cached blocks * block size, as the policy's prefill cost)."""
        predicted = self._matched_blocks(req).get(worker.url, 0)
        weighted = self._weighted_blocks(req).get(worker.url, 0.0)
        prefill = max(0, len(req.token_ids) - round(weighted * self.block_size))
        worker.in_flight += 1
        worker.pending_prefill_tokens += prefill
        return Routed(worker, req, predicted, prefill)

    def release_prefill(self, routed: Routed) -> None:
        self.first_byte(routed)
        routed.worker.in_flight -= 1

    def shares_kv_secret(self, prefill: WorkerState, decode: WorkerState) -> bool:
        """False when both workers publish key fingerprints and they differ: a misconfigured fleet
        (its tickets would not verify). Logged once per pair and counted; the request prefills locally."""
        if prefill.kv_key_id is None or decode.kv_key_id is None or prefill.kv_key_id == decode.kv_key_id:
            return True
        pair = (prefill.url, decode.url)
        if pair not in self._key_mismatches:
            self._key_mismatches.add(pair)
            logger.error("workers %s and %s have different $TANDEM_KV_TRANSFER_SECRET: no split between them "
                         "(their tickets would not verify); fix the fleet's configuration", *pair)
        self.metrics.pd_key_mismatches.inc()
        return False

    def pending_ticket(self, prefill: WorkerState, decode: WorkerState, token_ids: list[int]) -> dict | None:
        """A signed pending ticket for a lease this router names on ``prefill``, or None when
        concurrent legs are off, the secret is unknown here (or not the decode worker's), or the
        worker has issued no ticket yet."""
        t = prefill.kv_ticket
        if not (self.kv_secret and self.pd_concurrent and t):
            return None
        if decode.kv_key_id is not None and decode.kv_key_id != key_id(self.kv_secret):
            return None  # the decode worker would not verify it: sequential legs (the prefill worker signs)
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

    def _weighted_blocks(self, req: RouteRequest) -> dict[str, float]:
        if not req.block_hashes:
            return {}
        return self.matcher.match_weighted(req.block_hashes)

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


async def read_body(raw: Request, limit: int, deadline: float) -> bytes:
    """The request body, counted as it arrives: ClientError 413 as soon as it passes ``limit``
    bytes (a Content-Length over it: before reading any), 408 when it has not fully arrived by
    ``deadline`` (loop time). Either closes the connection (the rest of the body is never read)."""
    declared = raw.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ClientError(413 if declared.isdigit() else 400,
                          f"request body larger than {limit} bytes" if declared.isdigit() else "bad Content-Length",
                          headers=_CLOSE)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in raw.stream():
                size += len(chunk)
                if size > limit:
                    raise ClientError(413, f"request body larger than {limit} bytes", headers=_CLOSE)
                chunks.append(chunk)
    except TimeoutError:
        raise ClientError(408, "request body not received in time", headers=_CLOSE) from None
    except ClientDisconnect:
        raise ClientError(400, "client disconnected before sending its body", headers=_CLOSE) from None
    return b"".join(chunks)


def parse_body(body_bytes: bytes, chat: bool) -> dict:
    """The checked JSON object, or ClientError 400 (invalid JSON or UTF-8, nesting too deep,
    shapes no worker serves)."""
    try:
        body = json.loads(body_bytes)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ClientError(400, "request body must be a JSON object") from None
    return check_body(body, chat)


def build_router_app(router: Router, http: httpx.AsyncClient, api_key: str | None = None,
                     body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    app = FastAPI(title="tandem router")
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                      headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception):
        logger.exception("router: unexpected error")
        return _error(500, f"router error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if router.pool.healthy() else 503)

    @app.get("/tokenizer_info")
    async def tokenizer_info(raw: Request):
        """A healthy worker's answer, as it gave it (404 where workers do not serve it)."""
        headers = {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}
        for worker in router.pool.healthy():
            try:
                r = await http.get(f"{worker.url}/tokenizer_info", headers=headers, timeout=10)
            except httpx.HTTPError:
                continue
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        return _error(503, "no healthy worker could answer", "ServiceUnavailableError", "no_worker")

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type="text/plain; version=0.0.4")

    def served_names() -> list[str]:
        return sorted({m for w in router.pool.healthy() for m in w.models})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(n) for n in served_names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in served_names():
            return _error(404, f"The model `{model_id}` does not exist.", "NotFoundError", "model_not_found", "model")
        return _model_card(model_id)

    async def forward(raw: Request, path: str, chat: bool):
        deadline = asyncio.get_running_loop().time() + body_timeout_s
        try:
            body_bytes = await read_body(raw, MAX_BODY_BYTES, deadline)
            body = parse_body(body_bytes, chat)
        except ClientError as e:
            return e.response
        started = time.perf_counter()
        req = await router.route_request_async(body, chat, raw.headers.get(SESSION_HEADER))
        if not router.serves_model(req.model):
            return _error(404, f"The model `{req.model}` does not exist.", "NotFoundError", "model_not_found",
                          "model")
        headers = {k: v for k, v in raw.headers.items() if k.lower() in ("authorization", "content-type")}
        tried: set[str] = set()
        for attempt in range(2):
            routed = router.pick(req, tried, record=False)
            if routed is None:
                break
            if attempt == 0:
                router.metrics.routing_latency.observe(time.perf_counter() - started)
            tried.add(routed.worker.url)
            if attempt == 0 and router.pd is not None and _splittable(body, req):
                try:
                    body_bytes = await _maybe_split(router, http, routed, path, body, headers) or body_bytes
                except WorkerFailed as e:
                    router.release(routed)
                    return e.response()
            router.record(routed)  # after the P/D decision, which must not see this request as cached
            response = await _send(router, http, routed, path, body_bytes, headers, bool(body.get("stream")),
                                   may_retry=attempt == 0, client=raw)
            if response is not None:
                router.metrics.requests.labels(routed.worker.url, router.decision).inc()
                return response
            router.metrics.retries.inc()
        router.metrics.failures.inc()
        return _error(503, "no healthy worker could take the request", "ServiceUnavailableError", "no_worker")

    def forwarding(path: str, chat: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(raw: Request) -> Response:
            return await forward(raw, path, chat=chat)
        return endpoint

    for path, chat in (("/v1/completions", False), ("/v1/chat/completions", True), ("/tokenize", False),
                       ("/detokenize", False)):
        app.add_api_route(path, forwarding(path, chat), methods=["POST"])

    return app


# Errors raised before any byte of the request reached the worker: another worker may take it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class WorkerFailed(Exception):
    """The worker dropped the request after receiving it, or answered 500: the request may be
    what broke it, so it goes to no other worker; the client gets 502 ``worker_failed``."""

    def __init__(self, url: str, what: str) -> None:
        super().__init__(f"{url}: {what}")
        self.what = what

    def response(self) -> JSONResponse:
        return _error(502, f"the worker failed on this request ({self.what}); it was not retried",
                      "ServiceUnavailableError", "worker_failed")


def _retryable(resp: httpx.Response) -> bool:
    """An overloaded worker's answer: it did not run the request."""
    return resp.status_code == 503 and "retry-after" in resp.headers


def _fatal(resp: httpx.Response) -> bool:
    """A worker error that may have been caused by the request (502 is a failed KV load, the
    client's answer; 503 the worker's own refusal)."""
    return resp.status_code == 500 or resp.status_code >= 504


async def _send(router: Router, http: httpx.AsyncClient, routed: Routed, path: str, body: bytes,
                headers: dict, stream: bool, may_retry: bool = True, client: Request | None = None) -> Response | None:
    """The response for the client, or None when the caller may retry on another worker: the
    connection failed before the worker got the request, or (``may_retry``) the worker answered
    503 with Retry-After. Releases ``routed`` exactly once (here, or when the stream ends).
    ``client``: the client's request, its body read: a non-streaming answer is awaited only while
    the client stays (_while_client_stays); a stream's client is seen leaving by _relay."""
    url = routed.worker.url + path
    # a non-streaming answer's head comes with its end: the client may leave before either. NOTE: a
    # stream's head comes at once; cut before it, a decode leg might never reach its worker, whose
    # prefill worker would then hold the KV lease of a concurrent split until it expires
    watched = None if stream else client
    try:
        upstream = await _while_client_stays(watched, http.send(http.build_request("POST", url, content=body,
                                                                                   headers=headers), stream=True))
    except _ClientLeft:
        router.release(routed)
        return _client_left()
    except httpx.HTTPError as e:
        router.pool.report_failure(routed.worker.url)
        router.release(routed)
        return None if isinstance(e, _NOT_SENT) else WorkerFailed(url, type(e).__name__).response()
    if upstream.status_code >= 500 and upstream.status_code != 502:
        router.pool.report_failure(routed.worker.url)
    else:
        router.pool.report_success(routed.worker.url)
    if _fatal(upstream) or (may_retry and _retryable(upstream)):
        await upstream.aclose()
        router.release(routed)
        return None if _retryable(upstream) else WorkerFailed(url, f"HTTP {upstream.status_code}").response()
    passthrough = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    if not stream:
        try:
            content = await _while_client_stays(watched, upstream.aread())
        except _ClientLeft:
            return _client_left()
        except httpx.HTTPError as e:
            router.pool.report_failure(routed.worker.url)
            return WorkerFailed(url, type(e).__name__).response()
        finally:
            await upstream.aclose()  # unread (the client left): closes the connection, the worker aborts
            router.release(routed)
        if upstream.status_code == 200:
            try:
                router.observe_usage(routed, json.loads(content).get("usage"))
            except (ValueError, AttributeError):
                pass
        return Response(content, status_code=upstream.status_code, headers=passthrough)
    return StreamingResponse(_relay(router, routed, upstream), status_code=upstream.status_code,
                             headers=passthrough)


def _client_left() -> JSONResponse:
    """The answer to a client that is gone: nobody reads it."""
    return _error(499, "client disconnected", "client_closed_request", headers=_CLOSE)


class _ClientLeft(Exception):
    """The client disconnected while the router waited on its worker."""


async def _while_client_stays(client: Request | None, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or _ClientLeft when the client disconnects first: ``awaitable`` is
    then cancelled. An upstream request cancelled before its answer is read to the end loses its
    connection, so the worker sees its client leave and aborts the request, as for a direct client."""
    if client is None:
        return await awaitable
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_client_gone(client))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled: neither task outlives it
        pending = [t for t in (work, gone) if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if work.cancelled():
        raise _ClientLeft
    return work.result()


async def _client_gone(client: Request) -> None:
    """Return when the client disconnects. NOTE: its body was read to the end, so the ASGI receive
    channel has nothing left to give but http.disconnect."""
    while (await client.receive())["type"] != "http.disconnect":
        pass


def _single_prompt(prompt: Any) -> str | list[int] | None:
    """A completion's prompt when it is one prompt, in any of the API's forms ("text", ["text"],
    [ids], [[ids]]: lm-eval sends the list forms); None for several prompts or none."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    return None


def _wants_prompt_logprobs(body: dict) -> bool:
    """echo with logprobs, or prompt_logprobs: the prompt must be computed where the answer comes from."""
    return (body.get("echo") is True and body.get("logprobs") is not None) or body.get("prompt_logprobs") is not None


def _splittable(body: dict, req: RouteRequest) -> bool:
    """One prompt, one choice, tokenized here, not scored prompt by prompt, and not already part of
    a hand-off."""
    single = "messages" in body or _single_prompt(body.get("prompt")) is not None
    return bool(single and req.token_ids and body.get("n", 1) in (1, None) and "kv_transfer_params" not in body
                and not _wants_prompt_logprobs(body))


_PREFILL_LEG_TIMEOUT = httpx.Timeout(120.0, connect=2.0)
PENDING_TICKET_FIELDS = ("engine", "compat", "block_size", "lease_s", "kv_bytes_per_token")


async def _maybe_split(router: Router, http: httpx.AsyncClient, routed: Routed, path: str, body: dict,
                       headers: dict) -> bytes | None:
    """Ask the P/D decider; on a split, return the decode leg's body with its ticket: a pending
    one signed here while the prefill leg runs concurrently (when the router has the fleet's
    secret and knows the prefill worker's KV endpoint from an earlier ticket), else the prefill
    worker's own after its leg. None: prefill locally (decided so, or the prefill leg failed before
    the prefill worker ran it). WorkerFailed: the prefill worker failed on the request (it goes to
    no other worker). ``routed`` is not yet recorded in the routing history."""
    plan = router.plan_split(routed)
    if not plan.split or plan.prefill is None:
        router.metrics.pd_decisions.labels("local").inc()
        return None
    # NOTE: from here the decode worker will not prefill this prompt: while the prefill leg runs, its
    # tokens count on the prefill worker only (else every split in flight would make the decode
    # worker look busy, and make the next request split too)
    local_prefill_tokens = routed.prefill_tokens
    router.first_byte(routed)
    prefill_body = {k: v for k, v in body.items() if k != "stream_options"}
    prefill_body.update(max_tokens=1, stream=False)
    pending = router.pending_ticket(plan.prefill, routed.worker, routed.req.token_ids)
    if pending is not None:  # both legs at once: the decode worker pulls as soon as the lease exists
        prefill_body["kv_transfer_params"] = {"do_remote_decode": True, "lease_id": pending["lease_id"]}
        router.spawn(_prefill_leg(router, http, plan.prefill, routed.req, path, prefill_body, headers))
        router.metrics.pd_decisions.labels("split").inc()
        router.metrics.pd_concurrent.inc()
        return json.dumps({**body, "kv_transfer_params": pending}).encode()
    prefill_body["kv_transfer_params"] = {"do_remote_decode": True}
    ticket = await _prefill_leg(router, http, plan.prefill, routed.req, path, prefill_body, headers, raise_fatal=True)
    if ticket is None:
        router.count_prefill(routed, local_prefill_tokens)  # the decode worker prefills it after all
        return None
    router.metrics.pd_decisions.labels("split").inc()
    return json.dumps({**body, "kv_transfer_params": ticket}).encode()


async def _prefill_leg(router: Router, http: httpx.AsyncClient, worker: WorkerState, req: RouteRequest, path: str,
                       body: dict, headers: dict, raise_fatal: bool = False) -> dict | None:
    """POST the prefill leg; learn from it (cost per token, the worker's ticket fields). Returns
    the ticket, or None when the leg failed (counted as a fallback: the decode worker prefills).
    With ``raise_fatal``, a failure the request may have caused (dropped after sending, 500)
    raises WorkerFailed instead: the decode worker must not run it too."""
    leg = router.pick_prefill(worker, req)
    tokens_ahead = worker.pending_prefill_tokens
    started = time.perf_counter()
    ticket, fatal = None, None
    try:
        resp = await http.post(worker.url + path, json=body, headers=headers, timeout=_PREFILL_LEG_TIMEOUT)
        if resp.status_code == 200:
            ticket = resp.json().get("kv_transfer_params")
        elif resp.status_code >= 500 and resp.status_code != 502:
            router.pool.report_failure(worker.url)
            fatal = WorkerFailed(worker.url, f"HTTP {resp.status_code}") if _fatal(resp) else None
    except httpx.HTTPError as e:
        router.pool.report_failure(worker.url)
        fatal = None if isinstance(e, _NOT_SENT) else WorkerFailed(worker.url, type(e).__name__)
    except ValueError:
        pass
    finally:
        router.release_prefill(leg)
    if not isinstance(ticket, dict):
        if fatal is not None and raise_fatal:
            router.metrics.pd_decisions.labels("failed").inc()
            raise fatal
        router.metrics.pd_decisions.labels("fallback").inc()  # concurrent legs: the decode leg is under way already
        return None
    elapsed = time.perf_counter() - started
    router.metrics.pd_prefill_seconds.observe(elapsed)
    if router.pd is not None:
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


async def serve_router(router: Router, host: str, port: int, subscribers: list, on_ready=None,
                       api_key: str | None = None, head_timeout_s: float = HEAD_TIMEOUT_S,
                       body_timeout_s: float = BODY_TIMEOUT_S,
                       keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S) -> int:
    """Serve until SIGINT/SIGTERM. ``api_key``: required of every client but on OPEN_PATHS (None:
    open). Timeouts: see HEAD_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S."""
    import signal

    import uvicorn

    from tandem.entrypoints.openai.api_server import uvicorn_server

    # keep-alive to workers shorter than their (uvicorn's 5 s) so a pooled connection is not reused
    # just as the worker closes it: that would look like a worker dropping the request (no retry)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0), limits=limits) as http:
        await router.pool.start()
        tasks = [asyncio.create_task(s.run()) for s in subscribers]
        app = build_router_app(router, http, api_key, body_timeout_s)
        timeouts = HTTPTimeouts(head_timeout_s, body_timeout_s, keep_alive_timeout_s)
        server = uvicorn_server(uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_kwargs(timeouts)))
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
