"""uvicorn's h11 protocol with a bound on how long a client may take to send a whole request.

uvicorn times out idle keep-alive connections only after a first response; a connection that
never completes its request head (slowloris), trickles its body, or sends nothing at all is held
for ever. NOTE: from the moment a connection opens, and again after each response, the client has
``read_timeout_s`` to send a complete request (head and body); past it the connection is closed.
A request being answered (however long its response streams) is never cut by this timer.
"""

from __future__ import annotations

import asyncio
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT_S = 30.0
READ_TIMEOUT_ENV = "TANDEM_REQUEST_READ_TIMEOUT_S"


def read_timeout_s() -> float:
    return float(os.environ.get(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_S))


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s()
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._on_read_deadline)

    def _on_read_deadline(self) -> None:
        self._read_deadline = None
        receiving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)  # DONE: the request is all here
        if receiving and not self.transport.is_closing():
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app sees the client as gone
                self.cycle.message_event.set()
            self.transport.close()
