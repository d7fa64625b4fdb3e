"""`tandem serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLM.

Tokenization and detokenization run here, in the API process; the engine core runs in its own
process. Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from tandem.entrypoints.http_protocol import ApiKeyCheck, HTTPTimeouts, error_response, uvicorn_kwargs
from tandem.entrypoints.openai.metrics import HTTPMetrics, ServerMetrics
from tandem.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    OpenAIError,
    TokenizeRequest,
)
from tandem.entrypoints.openai.tool_calls import (
    KEEPS_SPECIAL_TOKENS,
    TOOL_CALL_PARSERS,
    JsonArrayCalls,
    NamedFunction,
    ToolCallExtractor,
    collect,
)
from tandem.kv_transfer.base import KV_TRANSFER_FAILED
from tandem.kv_transfer.ticket import TicketError, parse_ticket
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.sampling_params import ParamError, SamplingParams
from tandem.tokenizer import ChatInputError, chat_token_ids, template_messages, tokenizer_info
from tandem.version import __version__

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
MAX_HEADER_BYTES = 64 * 2**10  # 431 beyond it (h11 also refuses an incomplete head past this size)
OVERLOADED = "overloaded"  # 503 + Retry-After: at capacity, the request did not run (retry, here or elsewhere)
ENGINE_DEAD = "engine_dead"  # 500: the engine core died (perhaps of this request): not to be retried elsewhere


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(status, message, type_, param, code, headers)


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class SizeLimits:
    """ASGI middleware: headers over MAX_HEADER_BYTES get 431; a body over `limit` bytes gets 413
    whether or not it declares its length (a chunked upload is counted as it arrives, so it is
    never buffered past the limit); a body not all here `body_timeout_s` after the head gets 408.
    413 and 408 close the connection (the rest of the body is never read)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, body_timeout_s: float = HTTPTimeouts().body_s) -> None:
        self.app, self.limit, self.body_timeout_s = app, limit, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return await _error(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        received, refused, body_done = 0, None, False

        async def bounded_receive():
            nonlocal received, refused, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refused = _BodyRefused(408, f"request body not received within {self.body_timeout_s:g} s")
                raise refused from None
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.limit:
                refused = _BodyRefused(413, f"request body larger than {self.limit} bytes")
                raise refused
            return message

        async def guarded_send(message):
            if refused is None:
                await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except _BodyRefused:
            pass
        if refused is not None:
            await _error(refused.status, refused.message, headers={"Connection": "close"})(scope, receive, send)


def build_app(engine: AsyncLLM, served_model_names: Sequence[str], api_key: str | None = None,
              max_queued_requests: int | None = None, timeouts: HTTPTimeouts = HTTPTimeouts(),
              tokenizer_info_endpoint: bool = False, tool_call_parser: str | None = None) -> FastAPI:
    """``served_model_names``: every name a request may give in ``model``; responses and metrics
    report the first (as vLLM's ``--served-model-name``). ``tool_call_parser``: tool_choice "auto"
    is served, with this parser (vLLM's --enable-auto-tool-choice --tool-call-parser)."""
    if not served_model_names:
        raise ValueError("at least one served model name")
    served_model_name = served_model_names[0]
    app = FastAPI(title="tandem", version=__version__)
    app.add_middleware(SizeLimits, body_timeout_s=timeouts.body_s)
    app.state.engine = engine
    metrics = ServerMetrics(engine, served_model_name)
    app.add_middleware(HTTPMetrics, metrics=metrics)
    # admission: at most a full batch running plus this many queued; beyond it, 503 + Retry-After
    capacity = None if max_queued_requests is None else engine.config.scheduler.max_num_seqs + max_queued_requests

    def admit(count: int) -> None:
        if capacity is not None and engine.num_in_flight + count > capacity:
            raise OpenAIError(503, f"server is at capacity ({capacity} requests in flight); retry shortly",
                              "ServiceUnavailableError", code=OVERLOADED)

    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        # unknown routes, wrong methods, bodies FastAPI could not parse (deep nesting, bad UTF-8)
        return _error(exc.status_code, str(exc.detail), "NotFoundError" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return _error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                      param=loc[0] if loc else None)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError):
        # NOTE: Retry-After only for admission's refusal: the request never ran, and a router sends
        # it to another worker. Nothing that may have run (or broken) the engine carries it.
        headers = {"Retry-After": "1"} if exc.code == OVERLOADED else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health():
        if engine.errored:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "tandem", "root": engine.config.model.model,
                "parent": None, "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id, served_model_names)
        return model_card(model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(body.model, served_model_names)
        if body.messages is not None:
            ids = await _chat_ids(engine, body.messages, True, body.tools)
        elif body.prompt is not None:
            encode = functools.partial(engine.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
            ids = await _off_loop(encode) if len(body.prompt) > TOKENIZE_INLINE_CHARS else encode()
        else:
            raise OpenAIError(400, "give prompt or messages", param="prompt")
        answer = {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}
        if len(ids) <= TOKENIZE_INLINE_CHARS:
            return answer
        return Response(await _off_loop(json.dumps, answer), media_type="application/json")  # a big answer

    if tokenizer_info_endpoint:  # opt-in, as vLLM's: it hands out the chat template and special tokens
        @app.get("/tokenizer_info")
        async def get_tokenizer_info():
            return tokenizer_info(engine.tokenizer, engine.max_model_len)

    @app.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(raw: Request):
        # NOTE: the body is parsed here, not by FastAPI (on the loop): 4 MB of ids (a million) cost
        # ~1 s of a core to parse, validate, check and decode, all of it on the tokenize pool
        data = await raw.body()
        answer = functools.partial(_detokenize, engine, served_model_names, data)
        return await _off_loop(answer) if len(data) > TOKENIZE_INLINE_CHARS else answer()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, served_model_names)
        given = body.prompts()
        prompts = await _prompt_ids(engine, given)
        disagg = _disaggregation(engine, body, prompts)
        admit(len(prompts) * body.n)
        # max_tokens 0 (echo only): the prefill samples one token anyway; the answer leaves it out
        max_tokens = 1 if body.max_tokens == 0 else body.max_tokens
        params = [_params(engine, body, max_tokens, body.logprobs, len(ids), disagg) for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                text = given[i] if isinstance(given[i], str) else None  # echo returns the prompt as sent
                streams.append(_start(engine, {"prompt_token_ids": ids, "prompt": text}, p, f"{rid}-{i}",
                                      body.priority, disagg, body.structured_field()))
        except OpenAIError:
            await _close_all(streams)  # all or nothing
            raise
        outputs = [metrics.observe(_engine_errors_as_openai(s), p) for s, p in zip(streams, params)]
        created = int(time.time())
        if body.stream:
            return _sse(_completion_chunks(engine, outputs, body, rid, created, served_model_name), streams)
        try:
            outs = await _unless_disconnected(raw, asyncio.gather(*[_last(s) for s in outputs]))
        finally:
            await _close_all(streams)
        return _completion_response(engine, outs, body, rid, created, served_model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, served_model_names)
        tools = ChatTools.for_request(body, tool_call_parser)
        ids = await _chat_ids(engine, body.messages, body.add_generation_prompt, body.tools)
        disagg = _disaggregation(engine, body, [ids])
        admit(body.n)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(engine, body, max_tokens, logprobs, len(ids), disagg)
        if tools.keeps_special_tokens:
            params.skip_special_tokens = False
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = _start(engine, {"prompt_token_ids": ids}, params, rid, body.priority, disagg, body.structured_field())
        output = metrics.observe(_engine_errors_as_openai(stream), params)
        created = int(time.time())
        if body.stream:
            return _sse(_chat_chunks(engine, output, body, tools, rid, created, served_model_name), [stream])
        try:
            out = await _unless_disconnected(raw, _last(output))
        finally:
            await stream.aclose()
        return _chat_response(engine, out, body, tools, rid, created, served_model_name)

    return app


# -- request helpers --------------------------------------------------------------------------------
def _check_model(model: str | None, served: Sequence[str]) -> None:
    if model is not None and model not in served:
        raise OpenAIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")


@contextlib.contextmanager
def _as_400(structured_field: str | None = None) -> Iterator[None]:
    """The engine's ParamError (InputProcessor, SamplingParams) -> HTTP 400 in OpenAI's shape; a
    grammar that does not compile names the field the client gave it in."""
    try:
        yield
    except ParamError as e:
        param = structured_field if e.param == "structured_outputs" and structured_field else e.param
        raise OpenAIError(400, str(e), param=param, code=e.code) from None


# Inputs longer than this (characters in all; ids for /detokenize) are (de)tokenized on a worker
# thread, never on the loop.
TOKENIZE_INLINE_CHARS = 4096
_tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


async def _off_loop(fn, *args):
    """Run a tokenizer call on the tokenize pool (Rust tokenizers release the GIL while encoding)."""
    return await asyncio.get_running_loop().run_in_executor(_tokenize_pool, functools.partial(fn, *args))


def _json_body(model: type[BaseModel]) -> dict:
    """openapi_extra for an endpoint that parses its JSON body itself: the schema it accepts."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _detokenize(engine: AsyncLLM, served: Sequence[str], data: bytes) -> JSONResponse:
    """/detokenize's whole work on its body, its answer serialized: errors as FastAPI's own
    parsing of a DetokenizeRequest would give them (400)."""
    try:
        parsed = msgspec.json.decode(data)  # twice json's speed; it holds the GIL as json does
    except (msgspec.DecodeError, RecursionError):
        raise OpenAIError(400, "request body is not valid JSON (UTF-8, nested at most 1000 deep)") from None
    try:
        body = DetokenizeRequest.model_validate(parsed)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    _check_model(body.model, served)
    with _as_400():
        engine.input_processor.check_token_ids(body.tokens, "tokens")
    return JSONResponse({"prompt": _decode(engine.tokenizer, body.tokens)})


def _decode(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids)``. NOTE: a fast tokenizer's own decode holds the GIL for the whole
    decode (0.4 s per million ids), so on the tokenize pool it would still stall the event loop;
    its batch decode releases the GIL. Used where that is the same text: no clean-up of spaces
    after decoding (which transformers does in Python)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode(ids)
    return backend.decode_batch([ids], skip_special_tokens=False)[0]


async def _prompt_ids(engine: AsyncLLM, prompts: list[str | dict]) -> list[list[int]]:
    """Every prompt of a request -> its token ids (texts tokenized together, off the loop when long)."""
    texts = [p for p in prompts if isinstance(p, str)]
    if any(not t for t in texts):
        raise OpenAIError(400, "prompt is empty", param="prompt")
    encode = functools.partial(_encode_all, engine.tokenizer)
    encoded = iter(await _off_loop(encode, texts) if sum(map(len, texts)) > TOKENIZE_INLINE_CHARS
                   else encode(texts))
    all_ids = [next(encoded) if isinstance(p, str) else p["prompt_token_ids"] for p in prompts]
    with _as_400():
        for ids in all_ids:
            engine.input_processor.check_prompt(ids)
    return all_ids


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


async def _chat_ids(engine: AsyncLLM, messages, add_generation_prompt: bool, tools=None) -> list[int]:
    conv = template_messages([m.model_dump(exclude_none=True) for m in messages])
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    render = functools.partial(chat_token_ids, engine.tokenizer, conv, add_generation_prompt, tool_dicts)
    size = sum(len(m["content"]) for m in conv) + (len(json.dumps(tool_dicts)) if tool_dicts else 0)
    try:  # long conversations render and tokenize off the event loop
        ids = await _off_loop(render) if size > TOKENIZE_INLINE_CHARS else render()
    except ChatInputError as e:
        raise OpenAIError(400, str(e), param=e.param) from None
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault (e.g. role order)
        raise OpenAIError(400, f"chat template failed: {e}", param="messages") from None
    return list(ids)


LEASE_ID_RE = re.compile(r"[0-9a-f]{32}")


def _disaggregation(engine: AsyncLLM, body, prompts: list[list[int]]) -> dict:
    """kv_transfer_params -> keyword arguments for generate(); 400 for anything not redeemable."""
    p = body.kv_transfer_params
    if p is None:
        return {}

    def bad(message: str) -> OpenAIError:
        return OpenAIError(400, f"kv_transfer_params: {message}", param="kv_transfer_params")

    cfg = engine.config.kv_transfer
    if cfg is None:
        raise bad("this server does not do disaggregated serving (start it with --role prefill|decode|both "
                  "and $TANDEM_KV_TRANSFER_SECRET)")
    if len(prompts) != 1 or body.n != 1:
        raise bad("needs a single prompt and n = 1")
    if p.get("do_remote_decode") is True:
        if not cfg.sends:
            raise bad("this worker does not prefill for others (role decode)")
        if body.stream:
            raise bad("a prefill for a remote decode answers once: set stream to false")
        lease_id = p.get("lease_id")
        if lease_id is None:
            return {"do_remote_decode": True}
        if not isinstance(lease_id, str) or not LEASE_ID_RE.fullmatch(lease_id):
            raise bad("lease_id must be 32 lowercase hex digits")
        return {"do_remote_decode": lease_id}  # a decode leg already holds a pending ticket for it
    if p.get("do_remote_prefill") is True:
        if not cfg.receives:
            raise bad("this worker does not load remote KV (role prefill)")
        try:
            return {"remote_ticket": parse_ticket(p, cfg.secret, prompts[0])}
        except TicketError as e:
            raise OpenAIError(400, str(e), param="kv_transfer_params") from None
    raise bad("expected do_remote_decode or do_remote_prefill set to true")


def _params(engine: AsyncLLM, body, max_tokens: int | None, logprobs: int | None, prompt_len: int,
            disagg: dict | None = None) -> SamplingParams:
    if disagg and disagg.get("do_remote_decode"):
        max_tokens = 1  # the prefill leg computes the prompt; its one token only proves it ran
    inputs = engine.input_processor
    with _as_400():
        inputs.check_fits(prompt_len, max_tokens)
        params = body.sampling_params(inputs.max_tokens(prompt_len, max_tokens), logprobs)
    if disagg and params.prompt_logprobs is not None:
        raise OpenAIError(400, "prompt logprobs (echo with logprobs, or prompt_logprobs) need the prompt computed "
                               "here, not loaded from another worker: leave out kv_transfer_params",
                          param="kv_transfer_params")
    if disagg and disagg.get("do_remote_decode"):
        params.min_tokens = 0
    return params


def _start(engine: AsyncLLM, prompt: dict, params: SamplingParams, rid: str,
           priority: int, disagg: dict | None = None, structured_field: str | None = None) -> RequestStream:
    """Add the request (errors surface now, as HTTP errors) and return its output stream."""
    try:
        with _as_400(structured_field):
            stream = engine.generate(prompt, params, rid, priority=priority, **(disagg or {}))
    except EngineDeadError as e:
        raise OpenAIError(500, f"engine is not running: {e}", "InternalServerError", code=ENGINE_DEAD) from None
    return stream


async def _close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def _engine_errors_as_openai(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """A dead engine -> 500 ``engine_dead`` (never 503 + Retry-After: this very request may have
    killed it, and a router must not hand it to another worker); a request that finished with an
    error: a failed KV load -> 502, the engine's own failure on this request (the engine serves
    on) -> 500."""
    try:
        async for out in stream:
            if out.finished and out.error is not None:
                if out.error.startswith(KV_TRANSFER_FAILED):
                    raise OpenAIError(502, out.error, "ServiceUnavailableError", code="kv_transfer_failed")
                raise OpenAIError(500, out.error, "InternalServerError", code="request_failed")
            yield out
    except EngineDeadError as e:
        raise OpenAIError(500, f"engine died: {e}", "InternalServerError", code=ENGINE_DEAD) from None
    finally:
        await stream.aclose()


async def _unless_disconnected(raw: Request, awaitable):
    """Await a non-streaming result; if the client goes away first, cancel it (which aborts its
    requests in the engine and frees their blocks) and answer nothing."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await raw.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OpenAIError):
                await task
            raise OpenAIError(499, "client disconnected", "client_closed_request")


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None
    return last


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


# -- completions ----------------------------------------------------------------------------------
def _completion_logprobs(engine: AsyncLLM, token_ids: list[int], logprobs, offset0: int) -> dict | None:
    if logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    offset = offset0
    for tid, entry in zip(token_ids, logprobs):  # entry None: an unscored position (the first prompt token)
        text = engine.tokenizer.decode([tid])
        tokens.append(text)
        lps.append(None if entry is None else entry[tid].logprob)
        tops.append(None if entry is None else {lp.decoded_token or engine.tokenizer.decode([t]): lp.logprob
                                                for t, lp in entry.items() if t != tid or lp.rank is not None})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _echo_logprobs(engine: AsyncLLM, out: RequestOutput) -> dict | None:
    """The prompt's part of an echoed completion's logprobs: every prompt token, the first unscored."""
    scored = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return _completion_logprobs(engine, out.prompt_token_ids, scored, 0)


def _join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}


def _generated(c: CompletionOutput, body: CompletionRequest) -> CompletionOutput:
    """What the answer reports of ``c``: nothing generated for max_tokens 0 (echo only)."""
    if body.max_tokens != 0:
        return c
    return CompletionOutput(c.index, "", [], None, [] if c.logprobs is not None else None,
                            "length" if c.finish_reason is not None else None, None)


def _wire_prompt_logprobs(engine: AsyncLLM, out: RequestOutput) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt position, token id -> logprob, rank, decoded token."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                      "decoded_token": lp.decoded_token or engine.tokenizer.decode([t])} for t, lp in entry.items()}
            for entry in out.prompt_logprobs]


def _completion_response(engine, outs: list[RequestOutput], body: CompletionRequest, rid: str, created: int,
                         model: str) -> dict:
    choices = []
    for i, out in enumerate(outs):
        # the prompt's parts are the same for every choice of a prompt: made once
        prefix = _echo_text(engine, out) if body.echo else ""
        prompt_lp = _echo_logprobs(engine, out) if body.echo and body.logprobs is not None else None
        scored = _wire_prompt_logprobs(engine, out) if body.prompt_logprobs is not None else None
        for full in out.outputs:
            c = _generated(full, body)
            lp = _join_logprobs(prompt_lp, _completion_logprobs(engine, c.token_ids, c.logprobs, len(prefix)))
            choices.append({"index": i * body.n + c.index, "text": prefix + c.text, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason, "logprobs": lp, "prompt_logprobs": scored})
    response = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": _completion_usage(outs, body)}
    return _with_kv_transfer_params(response, outs)


def _completion_usage(outs: list[RequestOutput], body: CompletionRequest) -> dict:
    usage = _usage(outs)
    if body.max_tokens == 0:  # the token the prefill sampled is not part of the answer
        usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
    return usage


def _echo_text(engine: AsyncLLM, out: RequestOutput) -> str:
    """The prompt as the client sent it: its text, or its token ids decoded (no BOS text added)."""
    return out.prompt if out.prompt is not None else engine.tokenizer.decode(out.prompt_token_ids)


def _with_kv_transfer_params(response: dict, outs: list[RequestOutput]) -> dict:
    params = next((o.kv_transfer_params for o in outs if o.kv_transfer_params is not None), None)
    if params is not None:
        response["kv_transfer_params"] = params
    return response


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come: (prompt index, output)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Delta(NamedTuple):
    text: str
    token_ids: list[int]
    logprobs: list | None  # SampleLogprobs of token_ids, when asked
    text_offset: int  # where text starts in the choice's whole text


class _ChoiceDeltas:
    """Streaming bookkeeping shared by completions and chat: per choice, how much text and how many
    tokens went out already. NOTE: each choice ends (its finish_reason goes out) exactly once."""

    def __init__(self) -> None:
        self.sent: dict[Hashable, tuple[int, int]] = {}
        self.ended: set[Hashable] = set()

    def next(self, key: Hashable, c: CompletionOutput) -> _Delta | None:
        """What is new in ``c`` since the last chunk of choice ``key``; None: nothing to send."""
        if key in self.ended:
            return None
        t0, n0 = self.sent.get(key, (0, 0))
        delta, new_ids = c.text[t0:], c.token_ids[n0:]
        if not delta and not new_ids and c.finish_reason is None:
            return None
        self.sent[key] = (len(c.text), len(c.token_ids))
        if c.finish_reason is not None:
            self.ended.add(key)
        return _Delta(delta, new_ids, c.logprobs[n0:] if c.logprobs is not None else None, t0)


async def _completion_chunks(engine, streams, body: CompletionRequest, rid: str, created: int,
                             model: str) -> AsyncIterator[dict]:
    deltas = _ChoiceDeltas()
    finals: dict[int, RequestOutput] = {}
    echoed: dict[tuple[int, int], int] = {}  # choice -> length of the prompt text sent first (echo)
    async for i, out in _merge(streams):
        for full in out.outputs:
            c = _generated(full, body)
            key = (i, c.index)
            started = full.token_ids or full.finish_reason is not None  # prefill done: prompt logprobs complete
            if body.echo and key not in echoed and started:
                text = _echo_text(engine, out)
                echoed[key] = len(text)
                lp = _echo_logprobs(engine, out) if body.logprobs is not None else None
                yield _completion_chunk(body, rid, created, model, i * body.n + c.index, text, lp, None, None, out)
            d = deltas.next(key, c)
            if d is None:
                continue
            lp = _completion_logprobs(engine, d.token_ids, d.logprobs, d.text_offset + echoed.get(key, 0))
            yield _completion_chunk(body, rid, created, model, i * body.n + c.index, d.text, lp, c.finish_reason,
                                    c.stop_reason, out)
        if out.finished:
            finals[i] = out
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _completion_usage(list(finals.values()), body)}


def _completion_chunk(body: CompletionRequest, rid: str, created: int, model: str, index: int, text: str,
                      logprobs: dict | None, finish_reason: str | None, stop_reason: int | str | None,
                      out: RequestOutput) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                          "stop_reason": stop_reason}]}
    return {**chunk, "usage": _usage([out])} if body.continuous_usage else chunk


# -- chat -----------------------------------------------------------------------------------------
class ChatTools(NamedTuple):
    """How a chat request's output is read for tool calls."""
    extractor_factory: Callable[[], ToolCallExtractor] | None  # None: no tool calls (tool_choice none)
    calls_finish_as_tool_calls: bool  # auto and required: a choice that called tools ends "tool_calls"
    keeps_special_tokens: bool  # the parser's call marker is a special token

    @staticmethod
    def for_request(body: ChatCompletionRequest, parser: str | None) -> ChatTools:
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):  # the output is the arguments, by grammar
            return ChatTools(functools.partial(NamedFunction, choice.function.name), False, False)
        if body.effective_tool_choice() == "none":
            return ChatTools(None, False, False)
        if choice == "required":  # a JSON array of calls, by grammar
            return ChatTools(functools.partial(JsonArrayCalls, ("parameters",)), True, False)
        if parser is None:
            raise OpenAIError(400, '"auto" tool choice needs a server started with --enable-auto-tool-choice and '
                                   '--tool-call-parser; send tool_choice "none", "required" or a named function',
                              param="tool_choice")
        return ChatTools(TOOL_CALL_PARSERS[parser], True, parser in KEEPS_SPECIAL_TOKENS)

    def extractor(self) -> ToolCallExtractor | None:
        return self.extractor_factory() if self.extractor_factory else None

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" and self.calls_finish_as_tool_calls else reason


def _chat_message(tools: ChatTools, c: CompletionOutput) -> tuple[dict, str | None]:
    """A choice's response message and finish reason."""
    extractor = tools.extractor()
    if extractor is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = collect(extractor, c.text)
    message = {"role": "assistant", "content": content if content.strip() or not calls else None, "tool_calls": calls}
    return message, tools.finish_reason(c.finish_reason, bool(calls))


def _chat_logprobs(engine, token_ids: list[int], logprobs, k: int) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for tid, entry in zip(token_ids, logprobs):
        text = engine.tokenizer.decode([tid])
        ranked = sorted((lp for t, lp in entry.items() if lp.rank is not None), key=lambda lp: lp.rank)[:k]
        content.append({"token": text, "logprob": entry[tid].logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob,
                                          "bytes": list((lp.decoded_token or "").encode())} for lp in ranked]})
    return {"content": content}


def _chat_response(engine, out: RequestOutput, body: ChatCompletionRequest, tools: ChatTools, rid: str,
                   created: int, model: str) -> dict:
    k = body.top_logprobs or 0
    choices = []
    for c in out.outputs:
        message, finish_reason = _chat_message(tools, c)
        choices.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(engine, c.token_ids, c.logprobs, k),
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    response = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": _usage([out])}
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = _wire_prompt_logprobs(engine, out)
    return _with_kv_transfer_params(response, [out])


async def _chat_chunks(engine, stream, body: ChatCompletionRequest, tools: ChatTools, rid: str, created: int,
                       model: str) -> AsyncIterator[dict]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    role_sent = False  # the role chunks go out with the first output, so a client's TTFT stays honest
    deltas = _ChoiceDeltas()
    calls = _StreamedToolCalls(tools)
    final = None
    k = body.top_logprobs or 0
    async for out in stream:
        if not role_sent:
            role_sent = True
            for index in range(body.n):
                yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        for c in out.outputs:
            d = deltas.next(c.index, c)
            if d is None:
                continue
            lp = _chat_logprobs(engine, d.token_ids, d.logprobs, k)
            delta, finish_reason = calls.delta(c.index, d.text, c.finish_reason)
            chunk = {**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                          "finish_reason": finish_reason}]}
            yield {**chunk, "usage": _usage([out])} if body.continuous_usage else chunk
        final = out
    if body.stream_options and body.stream_options.include_usage and final is not None:
        yield {**base, "choices": [], "usage": _usage([final])}


class _StreamedToolCalls:
    """Per choice of a streamed chat: its text deltas read for tool calls (when the request has tools)."""

    def __init__(self, tools: ChatTools) -> None:
        self.tools = tools
        self.extractors: dict[int, ToolCallExtractor] = {}
        self.called: set[int] = set()

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A choice's next text -> (the chunk's delta, its finish_reason)."""
        if self.tools.extractor_factory is None:
            return ({"content": text} if text else {}), finish_reason
        extractor = self.extractors.get(index) or self.extractors.setdefault(index, self.tools.extractor_factory())
        content, calls = extractor.feed(text)
        if finish_reason is not None:
            more_content, more_calls = extractor.finish()
            content, calls = content + more_content, calls + more_calls
        if calls:
            self.called.add(index)
        delta: dict = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = calls
        return delta, self.tools.finish_reason(finish_reason, index in self.called)


def _sse(chunks: AsyncIterator[dict], streams: list[RequestStream]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except OpenAIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return _ClosingStreamingResponse(body(), streams, media_type="text/event-stream")


class _ClosingStreamingResponse(StreamingResponse):
    """NOTE: closes its requests' streams however the response ends (sent, client gone before or
    during the body, or never started), so an abandoned stream never stays in flight."""

    def __init__(self, content, streams: list[RequestStream], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close_all(self.streams)


# -- process --------------------------------------------------------------------------------------
def uvicorn_server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn.Server without its signal capture (it re-raises SIGTERM after shutdown, which would
    skip stopping the engine core); serve() installs its own handlers."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


async def serve(config, host: str, port: int, served_model_names: Sequence[str], api_key: str | None = None,
                max_queued_requests: int | None = None, kv_events: dict | None = None, on_ready=None,
                timeouts: HTTPTimeouts = HTTPTimeouts(), tokenizer_info_endpoint: bool = False,
                tool_call_parser: str | None = None) -> int:
    """Start the engine core, serve HTTP until SIGINT/SIGTERM or engine death. Exit code: 0, or 1
    when the engine died."""

    engine = AsyncLLM(config, **(kv_events or {}))
    await engine.start()
    app = build_app(engine, served_model_names, api_key, max_queued_requests, timeouts, tokenizer_info_endpoint,
                    tool_call_parser)
    server = uvicorn_server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30,
                                    h11_max_incomplete_event_size=MAX_HEADER_BYTES, **uvicorn_kwargs(timeouts)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # drain: stop accepting, finish in-flight, stop the core
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

    async def watch_engine():
        while not server.should_exit:
            if engine.errored:
                logger.error("engine core is dead (%s); shutting down", engine.errored)
                await asyncio.sleep(2.0)  # let /health report 503 and in-flight responses finish
                server.should_exit = True
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_engine())
    if on_ready is not None:
        on_ready()
    try:
        await server.serve()
    finally:
        watcher.cancel()
        await engine.shutdown()
    return 1 if engine.errored else 0
