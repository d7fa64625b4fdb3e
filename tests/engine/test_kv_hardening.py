"""Hardening of the KV side channels against peers without the fleet's secret (issue 17).

KV events: never published unsigned (they carry the token ids of cached prompt blocks).
KV transfer: the prefill worker's sender drops oversized or unsigned frames without growing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.kv_transfer.wire import KV_TRANSFER_CHANNEL
from tandem.zmq_auth import present_secret
from tests.helpers import free_port


def _cli(*argv: str, env_drop: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-m", "tandem.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- item 8: KV events ------------------------------------------------------------------------------------
def test_serve_refuses_kv_events_without_secret(model_dirs):
    """Before the fix this started a server publishing token ids unsigned (the run timed out)."""
    port = free_port()
    for flag in ("--kv-events-endpoint", "--kv-events-replay-endpoint"):
        out = _cli("serve", str(model_dirs["llama3-gqa"]), "--port", str(port), "--kv-cache-memory", "8MiB",
                   flag, f"tcp://127.0.0.1:{free_port()}", env_drop=("TANDEM_KV_EVENTS_SECRET",))
        assert out.returncode == 2, out.stderr[-2000:]
        assert "TANDEM_KV_EVENTS_SECRET" in out.stderr


def test_router_refuses_unsigned_kv_events():
    """A router without the secret would take any batch on the events socket as true."""
    spec = f"http://127.0.0.1:{free_port()},events=tcp://127.0.0.1:{free_port()}"
    out = _cli("router", "--worker", spec, env_drop=("TANDEM_KV_EVENTS_SECRET",))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "TANDEM_KV_EVENTS_SECRET" in out.stderr


def test_up_gives_every_worker_a_fresh_kv_events_secret(monkeypatch):
    """`tandem up` starts each worker with KV events and the fleet's secret (run_up makes a fresh
    one, secrets.token_hex(32)), whatever the caller's environment holds."""
    import secrets

    from tandem.router import launch

    started: list[tuple[list[str], dict]] = []

    class FakePopen:
        def __init__(self, cmd, env=None, **_):
            started.append((cmd, env))

    monkeypatch.delenv("TANDEM_KV_EVENTS_SECRET", raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    for roles in (["both", "both"], ["prefill", "decode"]):
        started.clear()
        secret = secrets.token_hex(32)
        launch._start_workers("model", roles, [], secret)
        assert len(started) == 2
        for cmd, env in started:
            assert "--kv-events-endpoint" in cmd
            assert env["TANDEM_KV_EVENTS_SECRET"] == secret


# -- item 9: the KV sender against peers without the secret ------------------------------------------------
SECRET = b"k" * 32


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so the next peak is measured from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.fixture
def sender():
    """A real KVSender (TCP) over a small cache: 2 layers of 64 blocks; blocks 1 and 2 leased."""
    import torch
    import zmq

    from tandem.config import KVTransferConfig
    from tandem.kv_transfer.sender import KVSender

    caches = [(torch.full((64, 16, 2, 8), float(i + 1)), torch.full((64, 16, 2, 8), -float(i + 1))) for i in range(2)]
    ctx = zmq.Context()
    s = KVSender(KVTransferConfig(role="prefill", secret=SECRET, transport="tcp", lease_s=30.0), caches, "compat", ctx)
    lease = s.hold([1, 2])
    yield s, lease.lease_id, ctx
    s.close()
    ctx.term()


def _pull(ctx, endpoint: str, lease_id: str, secret: bytes = SECRET, timeout_ms: int = 10_000) -> list:
    """One pull from a fresh DEALER; the messages received until PullDone/PullError (or silence)."""
    import zmq

    from tandem.kv_transfer.wire import Pull, PullDone, PullError, ToReceiver, WireCodec

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    present_secret(dealer, secret, KV_TRANSFER_CHANNEL)
    dealer.connect(endpoint)
    codec = WireCodec(secret, ToReceiver)
    got = []
    try:
        dealer.send_multipart(codec.encode(Pull(lease_id, "compat", [1, 2])))
        while dealer.poll(timeout_ms):
            frames = dealer.recv_multipart()
            msg, payload = WireCodec(SECRET, ToReceiver).decode(frames)
            got.append((msg, payload))
            if isinstance(msg, (PullDone, PullError)):
                break
    finally:
        dealer.close(0)
    return got


def _disconnected(ctx, endpoint: str, frames: list, timeout_s: float, secret: bytes | None = SECRET,
                  before: tuple[list, ...] = ()) -> bool:
    """Send the messages ``before`` and then ``frames`` from a fresh DEALER; True once the peer has
    closed that connection. The DEALER is closed only after that close (or the timeout): closing it
    while the peer drops a half-written multipart message trips an assertion in libzmq 4.3.5
    (session_base.cpp:233, clean_pipes) that aborts this whole process."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    dealer = ctx.socket(zmq.DEALER)
    dealer.copy_threshold = 0  # copy=False must not copy small frames: only the peer's memory is measured
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RECONNECT_IVL, 60_000)  # one connection: its close is what we wait for
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    if secret is not None:  # an authenticated peer sending junk (else: refused at the handshake)
        present_secret(dealer, secret, KV_TRANSFER_CHANNEL)
    try:
        dealer.connect(endpoint)
        for message in before:
            dealer.send_multipart(message)
        dealer.send_multipart(frames, copy=False)
        return bool(monitor.poll(int(timeout_s * 1000))) and \
            recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        dealer.disable_monitor()
        monitor.close(0)
        dealer.close(0)


def test_sender_drops_oversized_frame_without_growing(sender):
    """Before the fix the sender took a frame up to 1 GiB from anyone who could connect: a 64 MB
    junk frame was received whole (peak RSS +64 MB or more) before the MAC was even looked at."""
    from tandem.kv_transfer.wire import LayerData, PullDone

    s, lease_id, ctx = sender
    junk = b"\x00" * (64 << 20)
    _reset_peak_rss()
    base = _vm_kib("VmHWM")
    # the socket refuses the frame at its length prefix and closes the connection; before the
    # fix nothing closes it (the wait ends at its deadline) and the sender thread decodes it
    _disconnected(ctx, s.endpoint, [junk], timeout_s=10)
    got = _pull(ctx, s.endpoint, lease_id)  # the sender thread has passed the junk if it took it
    grown_mib = (_vm_kib("VmHWM") - base) / 1024
    assert grown_mib < 16, f"peak RSS grew {grown_mib:.0f} MiB for a junk frame"
    assert s._thread.is_alive()
    layers = [m for m, _ in got if isinstance(m, LayerData)]
    assert len(layers) == 2 and isinstance(got[-1][0], PullDone)  # a legitimate pull still works


def test_sender_refuses_forged_and_malformed_messages(sender):
    """Well-formed but signed with another secret: answered unauthenticated, the lease untouched;
    extra frames or a header over the cap: dropped; a legitimate pull still works afterwards."""
    from tandem.kv_transfer.wire import LayerData, PullDone, Release, Renew, ToReceiver, WireCodec

    s, lease_id, ctx = sender
    assert _pull(ctx, s.endpoint, lease_id, secret=b"x" * 32, timeout_ms=2000) == []  # refused at login
    # logged in, yet the first message's MAC is forged (it would end the lease if believed); the second
    # has a payload frame, which a control message never has; the third's 3.4 MB header is over the cap
    forged = WireCodec(b"x" * 32, ToReceiver).encode(Release(lease_id))
    signed = WireCodec(SECRET, ToReceiver).encode(Release(lease_id))
    oversized = WireCodec(SECRET, ToReceiver).encode(Renew(["0" * 32] * 100_000))
    assert _disconnected(ctx, s.endpoint, oversized, timeout_s=10, before=(forged, [*signed, b"\x00" * 1024]))
    got = _pull(ctx, s.endpoint, lease_id)
    assert sum(isinstance(m, LayerData) for m, _ in got) == 2 and isinstance(got[-1][0], PullDone)
    assert s.num_leases == 1 and not s._leases[lease_id].released


def test_receiver_caps_frames_at_the_largest_layer():
    """The decode side's DEALER takes no frame larger than one layer of its whole cache."""
    import torch
    import zmq

    from tandem.config import KVTransferConfig
    from tandem.kv_transfer.receiver import KVReceiver

    caches = [(torch.zeros(64, 16, 2, 8), torch.zeros(64, 16, 2, 8)) for _ in range(2)]
    ctx = zmq.Context()
    receiver = KVReceiver(KVTransferConfig(role="decode", secret=SECRET, transport="tcp"), caches, "compat", ctx)
    try:
        sock = receiver._sock("tcp://127.0.0.1:1")
        cap = sock.getsockopt(zmq.MAXMSGSIZE)
        assert 64 * 16 * 2 * 8 * 4 <= cap <= 1 << 20
    finally:
        receiver.close()
        ctx.term()


def test_a_peer_without_the_secret_cannot_make_the_sender_buffer_anything(sender):
    """Frames are capped, but ZMQ buffers a whole multi-frame message before anyone checks it:
    1,000 frames just under the cap cost the sender 117 MiB before connections needed the
    secret's password. Now such a peer never gets past the handshake."""
    s, lease_id, ctx = sender
    frame = b"\x00" * (60 << 10)
    _reset_peak_rss()
    base = _vm_kib("VmHWM")
    for _ in range(2):
        _disconnected(ctx, s.endpoint, [frame] * 1000, timeout_s=2, secret=None)
    grown_mib = (_vm_kib("VmHWM") - base) / 1024
    assert grown_mib < 16, f"peak RSS grew {grown_mib:.0f} MiB for an unauthenticated peer's message"
    got = _pull(ctx, s.endpoint, lease_id)
    assert sum(type(m).__name__ == "LayerData" for m, _ in got) == 2  # a legitimate pull still works


def test_kv_events_are_read_only_with_the_secret():
    """Signed is not secret: the events carry prompts' token ids. A subscriber (or replay client)
    without the secret's password gets nothing; one with it gets every batch."""
    import zmq

    from tandem.engine.kv_events import BlockStored, KVEventBatch
    from tandem.engine.kv_publisher import KV_EVENTS_CHANNEL, TOPIC, KVEventPublisher

    ctx = zmq.Context()
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    publisher = KVEventPublisher(ctx, endpoint, replay, SECRET)
    subs = {}
    try:
        for name, secret in (("stranger", None), ("wrong", b"y" * 32), ("fleet", SECRET)):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if secret is not None:
                present_secret(sub, secret, KV_EVENTS_CHANNEL)
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
            sub.connect(endpoint)
            subs[name] = sub
        got: dict[str, int] = {name: 0 for name in subs}
        for seq in range(40):  # PUB drops until a subscription has arrived: publish for a while
            publisher.publish(KVEventBatch(seq, 0.0, [BlockStored([seq.to_bytes(8, "big")], None, [1, 2, 3], 16)]))
            for name, sub in subs.items():
                while sub.poll(50):
                    sub.recv_multipart()
                    got[name] += 1
        assert got["fleet"] > 0 and got["stranger"] == got["wrong"] == 0, got
    finally:
        for sub in subs.values():
            sub.close(0)
        publisher.close()
        ctx.term()
