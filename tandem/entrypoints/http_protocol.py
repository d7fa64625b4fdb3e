"""Time bounds on HTTP clients, shared by `tandem serve` and the router.

uvicorn alone never times out a request head (its keep-alive timer is cancelled by any byte
received) nor a connection that sends nothing, and it waits for a body for ever. NOTE on the
bounds, as both servers apply them:
- a connection with no request in progress (just opened, or after a response) must send a
  complete request head within ``head_s``, else it is closed (``bounded_h11_protocol``);
- a request's body must have fully arrived ``body_s`` after its head, else 408 and the
  connection is closed (the app's body reader);
- an idle keep-alive connection is closed after ``keep_alive_s`` (uvicorn's own timer).
A request whose body has arrived is never cut by these, however long its response streams.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class HTTPTimeouts:
    head_s: float = 10.0
    body_s: float = 30.0
    keep_alive_s: float = 5.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HTTPTimeouts:
        return cls(args.head_timeout_s, args.body_timeout_s, args.keep_alive_timeout_s)


def add_timeout_args(p: argparse.ArgumentParser) -> None:
    d = HTTPTimeouts()
    g = p.add_argument_group("client time bounds")
    g.add_argument("--head-timeout-s", type=float, default=d.head_s,
                   help="a connection with no request in progress is closed if no complete head arrives in this")
    g.add_argument("--body-timeout-s", type=float, default=d.body_s,
                   help="a request body not fully arrived this long after its head gets 408")
    g.add_argument("--keep-alive-timeout-s", type=float, default=d.keep_alive_s,
                   help="an idle keep-alive connection is closed after this")


def bounded_h11_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus: a connection with no request in progress is closed
    ``head_timeout_s`` after it opened or after its last response ended."""

    class BoundedHeadH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            self._arm_head_timer()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._on_head_timeout)

        def _on_head_timeout(self) -> None:
            self._head_timer = None
            in_progress = self.cycle is not None and not self.cycle.response_complete
            if not in_progress and not self.transport.is_closing():
                self.transport.close()

    return BoundedHeadH11Protocol


def uvicorn_kwargs(timeouts: HTTPTimeouts) -> dict:
    return {"http": bounded_h11_protocol(timeouts.head_s), "timeout_keep_alive": timeouts.keep_alive_s}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ApiKeyCheck:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer KEY`, checked before
    anything of the body is read. Pure ASGI (not BaseHTTPMiddleware), so handlers still see the
    client's disconnect."""

    OPEN_PATHS = ("/health", "/metrics")

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key", "authentication_error",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
