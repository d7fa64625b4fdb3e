"""ZMQ connections that only holders of a shared secret can open (ZMQ's PLAIN mechanism).

A message's own MAC is checked only after ZMQ has buffered the whole message, and ZMQ bounds a
frame (MAXMSGSIZE) but not the number of frames in a message: a peer that may connect at all
can make a server buffer many capped frames. With PLAIN, the connection handshake already asks
for a password derived from the secret, so a peer without it never gets a message through, and
(for PUB sockets) never reads one. NOTE: PLAIN proves knowledge of the password to the server;
it does not encrypt. Over loopback that keeps every unprivileged local user out; across hosts,
run the channel on a trusted network. The messages keep their own MACs (integrity either way).

One ZAP handler thread serves each context that has server sockets; it stops when the last
server socket of that context is released.
"""

from __future__ import annotations

import hashlib
import hmac
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

USER = "tandem"
_lock = threading.Lock()
_handlers: dict[int, tuple[ThreadAuthenticator, int]] = {}  # id(context) -> (handler, server sockets)


def password(secret: bytes, purpose: str) -> str:
    """The PLAIN password of one channel (``purpose``: "kv-events", "kv-transfer"), never the secret itself."""
    return hmac.new(secret, f"tandem zmq plain {purpose}".encode(), hashlib.sha256).hexdigest()


def require_secret(sock: zmq.Socket, secret: bytes, purpose: str) -> None:
    """Make ``sock`` (a server: bind it after this call) accept only peers that present the
    secret's password for ``purpose``. Pair with ``release(sock)`` before closing it."""
    ctx = sock.context
    with _lock:
        handler, count = _handlers.get(id(ctx), (None, 0))
        if handler is None:
            handler = ThreadAuthenticator(ctx)
            handler.start()
        handler.configure_plain(domain=purpose, passwords={USER: password(secret, purpose)})
        _handlers[id(ctx)] = (handler, count + 1)
    sock.zap_domain = purpose.encode()
    sock.plain_server = True


def release(sock: zmq.Socket) -> None:
    """``sock`` (passed to require_secret) is about to close: stop the context's handler with its last server."""
    with _lock:
        handler, count = _handlers.get(id(sock.context), (None, 0))
        if handler is None:
            return
        if count > 1:
            _handlers[id(sock.context)] = (handler, count - 1)
            return
        del _handlers[id(sock.context)]
    handler.stop()


def present_secret(sock: zmq.Socket, secret: bytes, purpose: str) -> None:
    """Make ``sock`` (a client: connect it after this call) log in with the secret's password."""
    sock.plain_username = USER.encode()
    sock.plain_password = password(secret, purpose).encode()
