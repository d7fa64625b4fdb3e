"""KV events on ZMQ for routers: a PUB socket of sequence-numbered batches and a ROUTER socket
that replays recent batches so a subscriber can fill a gap or catch up after joining late.

PUB message:     [topic, seq (8-byte big-endian), payload (msgpack KVEventBatch), mac]
Replay request:  DEALER sends [b"", start_seq (8 bytes)]; the reply is one message per buffered
                 batch with seq >= start_seq, [b"", seq, payload, mac], then [b"", -1 (8 bytes), b"", b""].
                 A start_seq older than the buffer gets what is left: the subscriber sees the
                 gap in seq and knows to resynchronise fully (e.g. drop the worker's index).
mac = HMAC-SHA256(secret, seq || payload) when a secret is configured, else b"". With a secret,
both sockets also take only peers that log in with its password (tandem/zmq_auth.py): nobody
without it reads the events, which carry the token ids of cached prompt blocks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque

import msgspec
import zmq

from tandem.engine.kv_events import KVEventBatch
from tandem.zmq_auth import release, require_secret

TOPIC = b"kv-events"
KV_EVENTS_CHANNEL = "kv-events"  # the PLAIN password's purpose (tandem/zmq_auth.py)
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


def sign(secret: bytes | None, seq: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, seq + payload, hashlib.sha256).digest() if secret else b""


class KVEventPublisher:
    def __init__(self, ctx: zmq.Context, endpoint: str, replay_endpoint: str | None = None,
                 secret: bytes | None = None, buffer_batches: int = 10_000) -> None:
        self.secret = secret
        self.encoder = msgspec.msgpack.Encoder()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.MAXMSGSIZE, 256)  # subscribers send only their (short) subscriptions
        self._guard(self.pub)
        self.pub.bind(endpoint)
        self.replay = None
        if replay_endpoint:
            self.replay = ctx.socket(zmq.ROUTER)
            # a replay request is an empty frame and 8 bytes; the cap also bounds the PLAIN HELLO (~100 bytes)
            self.replay.setsockopt(zmq.MAXMSGSIZE, 256)
            self._guard(self.replay)
            self.replay.bind(replay_endpoint)
        self.buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_batches)

    def publish(self, batch: KVEventBatch) -> None:
        seq = batch.seq.to_bytes(8, "big", signed=True)
        payload = self.encoder.encode(batch)
        mac = sign(self.secret, seq, payload)
        self.buffer.append((batch.seq, payload, mac))
        self.pub.send_multipart([TOPIC, seq, payload, mac])

    def serve_replays(self) -> None:
        """Answer every pending replay request (non-blocking; called from the core's loop)."""
        if self.replay is None:
            return
        while self.replay.poll(0):
            frames = self.replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            for seq, payload, mac in list(self.buffer):
                if seq >= start:
                    self.replay.send_multipart([identity, b"", seq.to_bytes(8, "big", signed=True), payload, mac])
            self.replay.send_multipart([identity, b"", END_OF_REPLAY, b"", b""])

    def _guard(self, sock: zmq.Socket) -> None:
        """Only peers holding the secret connect: the events carry prompts' token ids."""
        if self.secret is not None:
            require_secret(sock, self.secret, KV_EVENTS_CHANNEL)

    def close(self) -> None:
        for sock in (self.pub, self.replay):
            if sock is not None:
                if self.secret is not None:
                    release(sock)
                sock.close(0)
