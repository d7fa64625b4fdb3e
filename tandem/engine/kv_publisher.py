"""KV events on ZMQ for routers: a PUB socket of sequence-numbered batches and a ROUTER socket
that replays recent batches so a subscriber can fill a gap or catch up after joining late.

PUB message:     [topic, seq (8-byte big-endian), payload (msgpack KVEventBatch), mac]
Replay request:  DEALER sends [b"", start_seq (8 bytes)]; the reply is one message per buffered
                 batch with seq >= start_seq, [b"", seq, payload, mac], then [b"", -1 (8 bytes), b"", b""].
                 A start_seq older than the buffer gets what is left: the subscriber sees the
                 gap in seq and knows to resynchronise fully (e.g. drop the worker's index).
mac = HMAC-SHA256(secret, seq || payload) when a secret is configured, else b"".
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque

import msgspec
import zmq

from tandem.engine.kv_events import KVEventBatch

TOPIC = b"kv-events"
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
        self.pub.bind(endpoint)
        self.replay = None
        if replay_endpoint:
            self.replay = ctx.socket(zmq.ROUTER)
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

    def close(self) -> None:
        self.pub.close(0)
        if self.replay is not None:
            self.replay.close(0)
