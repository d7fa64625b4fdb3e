"""Messages on the KV transfer channel (ZMQ DEALER on the decode side, ROUTER on the prefill side).

Every message is ``[header, mac, *payload]``: a msgpack-encoded tagged struct, HMAC-SHA256 of the
header under the fleet's secret, then raw tensor bytes (LayerData only; their sizes are in the
signed header). Nothing is pickled; a frame that does not decode or verify is dropped.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec
import zmq

# Frame caps (ZMQ_MAXMSGSIZE on every socket that receives from a peer): ZMQ reads a frame's length
# before its bytes and drops the connection of a peer that announces more, so no single frame from
# an unauthenticated peer costs more than the cap. NOT covered: ZMQ buffers a multipart message
# whole before delivering it and has no limit on its number of parts (1,000 capped frames to the
# sender: +117 MiB peak), so a peer that can connect can still make the process buffer; closing
# that needs the handshake itself to require the secret (ZMQ PLAIN + ZAP or CURVE). A control message
# (Pull, Renew, Release, ShmGrant, ...) lists at most one block id (<= 9 bytes packed) or one lease
# id (32 hex digits, 34 bytes packed) per block of the cache (a lease holds >= 1 block), so
# CONTROL_BYTES_PER_BLOCK per block plus a fixed allowance bounds every legitimate one.
KV_TRANSFER_CHANNEL = "kv-transfer"  # the PLAIN password's purpose (tandem/zmq_auth.py)
CONTROL_BASE_BYTES = 64 << 10
CONTROL_BYTES_PER_BLOCK = 64


def control_frame_cap(num_blocks: int) -> int:
    """The largest frame a legitimate control message needs, for a cache of ``num_blocks`` blocks."""
    return CONTROL_BASE_BYTES + CONTROL_BYTES_PER_BLOCK * num_blocks


def data_frame_cap(num_blocks: int, block_bytes: int) -> int:
    """The largest legitimate frame on the data path: K (or V) of one layer for every block of the
    receiving cache (a pull never asks for more blocks than it has room for), or a control message."""
    return max(control_frame_cap(num_blocks), num_blocks * block_bytes)


# -- decode -> prefill ----------------------------------------------------------------------------------
class Pull(msgspec.Struct, tag=True):
    """Send the listed blocks of the lease, layer by layer; or, when ``host`` (the receiver's
    ``shm.host_id()``) equals the sender's, grant a read of its shared-memory region instead.
    ``pending`` (a pending ticket): ``block_ids`` are indices into the lease's block list, the
    lease may not exist yet (the sender parks the pull, answering PullWaiting, until it does) and
    must be for the prompt with hash ``prompt``."""
    lease_id: str
    compat: str
    block_ids: list[int]
    host: str = ""
    pending: bool = False
    prompt: str = ""


class Renew(msgspec.Struct, tag=True):
    """Heartbeat: extend these leases by the sender's lease length."""
    lease_ids: list[str]


class Release(msgspec.Struct, tag=True):
    """The decode side is done with the lease (loaded, or no longer wants it)."""
    lease_id: str


# -- prefill -> decode ----------------------------------------------------------------------------------
class LayerData(msgspec.Struct, tag=True):
    """Followed by two frames: K then V of ``num_blocks`` blocks of layer ``layer``, the pull's
    blocks ``first_block`` onwards (a streamed pull gets each layer in several pieces)."""
    lease_id: str
    layer: int
    num_blocks: int
    nbytes: int  # of each of the two frames
    first_block: int = 0


class ShmGrant(msgspec.Struct, tag=True):
    """Read the lease's blocks yourself from the sender's SharedKVRegion (tandem/kv_transfer/shm.py):
    ``/proc/<pid>/fd/<fd>``, a memfd named with ``token``, ``nbytes`` long, ``num_blocks`` per layer.
    The lease lives at least ``valid_s`` from the moment this was sent; release it when done."""
    lease_id: str
    pid: int
    fd: int
    token: str
    nbytes: int
    num_blocks: int
    valid_s: float
    block_ids: list[int] = []  # the sender's ids of the pulled blocks, in the pull's order
    held_s: float = 0.0  # how long the pull waited here (parked until its prefill ended) before this


class PullWaiting(msgspec.Struct, tag=True):
    """Keep-alive for a parked pull: its prefill is still queued or computing."""
    lease_id: str


class PullDone(msgspec.Struct, tag=True):
    lease_id: str
    num_layers: int


class PullError(msgspec.Struct, tag=True):
    lease_id: str
    kind: str  # unknown_lease | lease_expired | incompatible | bad_blocks | unauthenticated | prefill_failed
    message: str


ToSender = Pull | Renew | Release
ToReceiver = LayerData | ShmGrant | PullWaiting | PullDone | PullError


class Doorbell:
    """Wakes a thread blocked in a ZMQ poll: ``ring`` from one thread, ``socket`` registered in the
    other's poller, ``clear`` there once woken. Each end is used by one thread only."""

    def __init__(self, ctx: zmq.Context, name: str) -> None:
        addr = f"inproc://{name}-{id(self)}"
        self.socket = ctx.socket(zmq.PULL)
        self.socket.bind(addr)
        self._out = ctx.socket(zmq.PUSH)
        self._out.connect(addr)

    def ring(self) -> None:
        try:
            self._out.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # rings are pending already: the thread will wake anyway
            pass

    def clear(self) -> None:
        while self.socket.poll(0):
            self.socket.recv()

    def close(self) -> None:
        self.socket.close(0)
        self._out.close(0)


class WireCodec:
    def __init__(self, secret: bytes, decode_type) -> None:
        self.secret = secret
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(decode_type)

    def mac(self, header: bytes) -> bytes:
        return hmac.new(self.secret, header, hashlib.sha256).digest()

    def encode(self, msg) -> list[bytes]:
        header = self.encoder.encode(msg)
        return [header, self.mac(header)]

    def decode(self, frames: list) -> tuple[object, list]:
        """(message, payload frames). PermissionError when the MAC does not verify,
        msgspec errors on junk."""
        if len(frames) < 2:
            raise msgspec.DecodeError("short message")
        header, mac = bytes(frames[0]), bytes(frames[1])
        if not hmac.compare_digest(self.mac(header), mac):
            raise PermissionError("message not signed with this fleet's secret")
        return self.decoder.decode(header), frames[2:]
