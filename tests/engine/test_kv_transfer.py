"""Disaggregated prefill/decode at the engine-core level: a prefill core and a decode core in one
process, talking over real ZMQ TCP on 127.0.0.1. Greedy outputs must equal a single core's; every
failure must end with its defined outcome and leave both block pools empty."""

from __future__ import annotations

import socket
import threading
import time

import msgspec
import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, KVTransferConfig, ModelConfig, SchedulerConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request
from tandem.kv_transfer.ticket import Ticket, TicketError, parse_ticket, sign
from tandem.sampling_params import SamplingParams
from tests.helpers import REPO_ROOT, wait_until

SECRET = b"s" * 32


def make_core(model_dir, role=None, secret=SECRET, budget: int = 256, **kv) -> EngineCore:
    transfer = None
    if role is not None:
        kv.setdefault("lease_s", 5.0)
        kv.setdefault("transfer_timeout_s", 2.0)
        transfer = KVTransferConfig(role=role, secret=secret, **kv)
    config = EngineConfig(ModelConfig(str(model_dir)), CacheConfig(block_size=16, kv_cache_memory="4MiB"),
                          SchedulerConfig(max_num_batched_tokens=budget), kv_transfer=transfer)
    return EngineCore(config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tandem.testing import build_preset

    return build_preset("llama3-gqa", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def cores(model_dir):
    """TCP: the decode side never asks for shared memory (as between two hosts)."""
    prefill, decode, single = (make_core(model_dir, "prefill"), make_core(model_dir, "decode", transport="tcp"),
                               make_core(model_dir))
    yield prefill, decode, single
    for core in (prefill, decode):
        core.close()


@pytest.fixture(scope="module")
def shm_cores(model_dir, cores):
    """Shared memory: both sides on this host with transport auto; the reference core is shared."""
    prefill, decode = make_core(model_dir, "prefill"), make_core(model_dir, "decode")
    yield prefill, decode, cores[2]
    for core in (prefill, decode):
        core.close()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_until(cores, done, timeout_s: float = 30.0) -> dict[str, list]:
    """Step every core until done() holds; returns request id -> its CoreOutputs."""
    outs: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while not done(outs):
        assert time.monotonic() < deadline, "timed out"
        for core in cores:
            if core.has_unfinished_requests() or core.has_pending_transfers():
                for o in core.step():
                    outs.setdefault(o.request_id, []).append(o)
        time.sleep(0.001)
    return outs


def finished(*rids):
    return lambda outs: all(outs.get(r) and outs[r][-1].finish_reason for r in rids)


def tokens(outs, rid) -> list[int]:
    return [t for o in outs[rid] for t in o.new_token_ids]


def prefill_ticket(prefill: EngineCore, rid: str, prompt: list[int]) -> dict:
    prefill.add_request(Request(rid, prompt, greedy(1), max_tokens=1, do_remote_decode=True))
    outs = run_until([prefill], finished(rid))
    params = outs[rid][-1].kv_transfer_params
    assert params is not None and params["do_remote_prefill"]
    return params


def decode_request(rid, prompt, params, max_tokens, secret=SECRET) -> Request:
    return Request(rid, prompt, greedy(max_tokens), max_tokens=max_tokens,
                   remote_ticket=parse_ticket(params, secret, prompt))


def single_output(single: EngineCore, prompt: list[int], max_tokens: int) -> list[int]:
    rid = f"ref-{time.monotonic_ns()}"
    single.add_request(Request(rid, prompt, greedy(max_tokens), max_tokens=max_tokens))
    return tokens(run_until([single], finished(rid)), rid)


def wait_idle(*cores, timeout_s: float = 10.0) -> None:
    """Step until no transfer or lease is pending, then check both pools are empty."""
    deadline = time.monotonic() + timeout_s
    while any(c.has_unfinished_requests() or c.has_pending_transfers() for c in cores):
        assert time.monotonic() < deadline, "transfers still pending"
        for c in cores:
            c.step()
        time.sleep(0.005)
    for c in cores:
        c.assert_idle()


def prompt_of(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 250 + 3 for i in range(n)]


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 130])
def test_disaggregated_greedy_equals_single_core(cores, length):
    prefill, decode, single = cores
    prompt = prompt_of(length, length)
    params = prefill_ticket(prefill, f"p{length}", prompt)
    decode.add_request(decode_request(f"d{length}", prompt, params, 12))
    outs = run_until([prefill, decode], finished(f"d{length}"))
    assert tokens(outs, f"d{length}") == single_output(single, prompt, 12)
    wait_idle(prefill, decode)
    if length > 1:
        assert decode.connector.stats.loads_ok + decode.connector.stats.local_skips > 0


@pytest.mark.parametrize("pair", ["cores", "shm_cores"])
def test_decode_side_prefix_hit_pulls_only_missing_blocks(request, pair):
    prefill, decode, single = request.getfixturevalue(pair)
    shared = prompt_of(64, 99)
    # warm the decode worker's cache with the first 64 tokens (4 full blocks)
    decode.add_request(Request("warm", shared + [5], greedy(1), max_tokens=1))
    run_until([decode], finished("warm"))
    prompt = shared + prompt_of(50, 100)
    params = prefill_ticket(prefill, "p-hit", prompt)
    before = decode.connector.stats.bytes_received
    decode.add_request(decode_request("d-hit", prompt, params, 10))
    outs = run_until([prefill, decode], finished("d-hit"))
    assert outs["d-hit"][0].num_cached_tokens == 64
    pulled_blocks = (decode.connector.stats.bytes_received - before) // decode.runner.kv_bytes_per_block
    assert pulled_blocks == 4  # blocks 4..7 of 114 tokens (113 loaded); 0..3 were cached here
    assert tokens(outs, "d-hit") == single_output(single, prompt, 10)
    wait_idle(prefill, decode)


def test_fully_cached_prompt_releases_the_lease_without_pulling(cores):
    prefill, decode, _ = cores
    prompt = prompt_of(33, 7)  # 32 tokens to load: two full blocks
    decode.add_request(Request("warm2", prompt, greedy(1), max_tokens=1))
    run_until([decode], finished("warm2"))
    params = prefill_ticket(prefill, "p-cached", prompt)
    skips = decode.connector.stats.local_skips
    decode.add_request(decode_request("d-cached", prompt, params, 4))
    run_until([prefill, decode], finished("d-cached"))
    assert decode.connector.stats.local_skips == skips + 1
    wait_idle(prefill, decode)
    assert prefill.connector.sender.stats.leases_expired == 0


# -- faults ----------------------------------------------------------------------------------------------
class CuttingProxy:
    """TCP forwarder that drops the connection once `cut_after` bytes went from server to client."""

    def __init__(self, target_port: int, cut_after: int, on_cut=None) -> None:
        self.target_port, self.cut_after, self.on_cut = target_port, cut_after, on_cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is gone: so is this connection
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.cut_after), daemon=True).start()

    def _pipe(self, src, dst, limit) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    self.cuts += 1
                    if self.on_cut is not None:
                        self.on_cut()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


def resigned(params: dict, secret: bytes = SECRET, **changes) -> dict:
    ticket = msgspec.convert({**params, **changes}, Ticket)
    return msgspec.to_builtins(sign(ticket, secret))


@pytest.fixture(scope="module")
def recompute_decode(model_dir):
    core = make_core(model_dir, "decode", failure_policy="recompute", transport="tcp")
    yield core
    core.close()


def fail_and_check(prefill, decode, rid, prompt, params, secret=SECRET):
    """Run a decode request whose transfer must fail; returns its outputs."""
    decode.add_request(decode_request(rid, prompt, params, 6, secret))
    outs = run_until([prefill, decode], finished(rid))
    wait_idle(prefill, decode)
    return outs[rid]


def test_lease_expires_without_heartbeat_and_then_fails_or_recomputes(model_dir, cores, recompute_decode):
    _, decode, single = cores
    prefill = make_core(model_dir, "prefill", lease_s=0.3)
    try:
        prompt = prompt_of(70, 3)
        params = prefill_ticket(prefill, "p-exp", prompt)
        assert prefill.has_pending_transfers()
        # no heartbeat comes: stepping alone, the lease must end by itself
        wait_until(lambda: prefill.step() is not None and prefill.connector.sender.stats.leases_expired == 1,
                   timeout_s=10, what="the unrenewed lease to expire")
        wait_idle(prefill)  # the lease ended: its blocks went back to the pool
        unknown = decode.connector.stats.failures.get("unknown_lease", 0)
        recomputed = recompute_decode.connector.stats.recomputed
        out = fail_and_check(prefill, decode, "d-exp", prompt, params)
        assert out[-1].finish_reason == "error" and "unknown_lease" in out[-1].error
        assert decode.connector.stats.failures["unknown_lease"] == unknown + 1
        outs = fail_and_check(prefill, recompute_decode, "r-exp", prompt, params)
        assert [t for o in outs for t in o.new_token_ids] == single_output(single, prompt, 6)
        assert recompute_decode.connector.stats.recomputed == recomputed + 1
    finally:
        prefill.close()


def test_heartbeats_keep_a_waiting_lease_alive(model_dir, cores):
    _, decode, single = cores
    prefill = make_core(model_dir, "prefill", lease_s=0.6)
    try:
        prompt = prompt_of(50, 4)
        params = prefill_ticket(prefill, "p-hb", prompt)
        req = decode_request("d-hb", prompt, params, 5)
        decode.add_request(req)  # watched from now on, but not stepped: it only waits
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            prefill.step()
            time.sleep(0.02)
        assert prefill.connector.sender.stats.leases_expired == 0
        outs = run_until([prefill, decode], finished("d-hb"))
        assert tokens(outs, "d-hb") == single_output(single, prompt, 5)
        wait_idle(prefill, decode)
    finally:
        prefill.close()


def test_dropped_connection_mid_transfer_times_out(model_dir, cores, recompute_decode):
    prefill, decode, single = cores
    port = int(prefill.connector.sender.endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=4096)  # a few layers' worth, then the link dies
    try:
        prompt = prompt_of(120, 5)
        params = resigned(prefill_ticket(prefill, "p-cut", prompt), engine=f"tcp://127.0.0.1:{proxy.port}")
        out = fail_and_check(prefill, decode, "d-cut", prompt, params)
        assert out[-1].finish_reason == "error" and "timeout" in out[-1].error
        assert proxy.cuts >= 1
        params = resigned(prefill_ticket(prefill, "p-cut2", prompt), engine=f"tcp://127.0.0.1:{proxy.port}")
        outs = fail_and_check(prefill, recompute_decode, "r-cut", prompt, params)
        assert [t for o in outs for t in o.new_token_ids] == single_output(single, prompt, 6)
    finally:
        proxy.close()


PREFILL_WORKER = """
import json, sys, time
from tests.engine.test_kv_transfer import make_core, prefill_ticket, prompt_of
core = make_core(sys.argv[1], "prefill", lease_s=30.0)
print(json.dumps(prefill_ticket(core, "p-kill", prompt_of(120, 21))), flush=True)
while True:
    core.step()
    time.sleep(0.001)
"""


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_prefill_worker_killed_mid_transfer(model_dir, cores, recompute_decode, policy):
    """A prefill worker in its own process is SIGKILLed once the first layers have gone out."""
    import json
    import os
    import signal
    import subprocess
    import sys

    decode = cores[1] if policy == "fail" else recompute_decode
    proc = subprocess.Popen([sys.executable, "-c", PREFILL_WORKER, str(model_dir)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT)
    proxy = None
    try:
        params = json.loads(proc.stdout.readline())
        port = int(params["engine"].rsplit(":", 1)[1])
        proxy = CuttingProxy(port, cut_after=40_000, on_cut=lambda: os.kill(proc.pid, signal.SIGKILL))
        prompt = prompt_of(120, 21)
        out = fail_and_check(decode, decode, f"d-kill-{policy}", prompt,
                             resigned(params, engine=f"tcp://127.0.0.1:{proxy.port}"))
        assert proc.wait(10) == -signal.SIGKILL and proxy.cuts >= 1
        if policy == "fail":
            assert out[-1].finish_reason == "error" and "timeout" in out[-1].error
        else:
            assert [t for o in out for t in o.new_token_ids] == single_output(cores[2], prompt, 6)
    finally:
        proc.kill()
        if proxy is not None:
            proxy.close()


def test_sender_gone_before_the_pull_times_out(model_dir, cores):
    _, decode, _ = cores
    prefill = make_core(model_dir, "prefill")
    prompt = prompt_of(40, 6)
    params = prefill_ticket(prefill, "p-gone", prompt)
    prefill.close()  # the prefill worker is gone; nobody answers at its endpoint any more
    out = fail_and_check(decode, decode, "d-gone", prompt, params)
    assert out[-1].finish_reason == "error" and "timeout" in out[-1].error


def test_wrong_secret_and_incompatible_layout_fail_cleanly(model_dir, cores):
    prefill, decode, _ = cores
    # a refused handshake must fail the load long before its transfer timeout would (a loaded
    # machine can delay the handshake, so the timeout is far from the race)
    other = make_core(model_dir, "decode", secret=b"x" * 32, transfer_timeout_s=20.0)
    try:
        prompt = prompt_of(45, 8)
        params = resigned(prefill_ticket(prefill, "p-sec", prompt), secret=b"x" * 32)
        expired = prefill.connector.sender.stats.leases_expired
        out = fail_and_check(prefill, other, "d-sec", prompt, params, b"x" * 32)
        assert out[-1].finish_reason == "error" and "unauthenticated" in out[-1].error
        # a peer without the secret cannot release the lease either: it runs out
        assert prefill.connector.sender.stats.leases_expired == expired + 1
        params = resigned(prefill_ticket(prefill, "p-cmp", prompt), compat="0" * 32)
        out = fail_and_check(prefill, decode, "d-cmp", prompt, params)
        assert out[-1].finish_reason == "error" and "incompatible" in out[-1].error
        assert prefill.connector.sender.stats.leases_expired == expired + 1  # released, not expired
    finally:
        other.close()


def test_forged_or_mismatched_tickets_are_refused_before_anything_is_allocated(cores):
    prefill, _, _ = cores
    prompt = prompt_of(40, 9)
    params = prefill_ticket(prefill, "p-forge", prompt)
    with pytest.raises(TicketError, match="signature"):
        parse_ticket({**params, "block_ids": [0, 1, 2]}, SECRET, prompt)
    with pytest.raises(TicketError, match="signature"):
        parse_ticket(params, b"y" * 32, prompt)
    with pytest.raises(TicketError, match="different prompt"):
        parse_ticket(params, SECRET, prompt[:-1] + [4])
    with pytest.raises(TicketError, match="kv_transfer_params"):
        parse_ticket({"do_remote_prefill": True}, SECRET, prompt)
    with pytest.raises(TicketError, match="kv_transfer_params"):
        parse_ticket({**params, "extra": 1}, SECRET, prompt)
    # a signed ticket that lies about its blocks covering the prompt is refused too
    with pytest.raises(TicketError, match="cover"):
        parse_ticket(resigned(params, block_ids=[0]), SECRET, prompt)
    wait_idle(prefill, timeout_s=10)  # lease not redeemed: expires (5 s) and frees


def test_aborts_in_every_state_free_blocks_on_both_sides(model_dir, cores):
    prefill, decode, _ = cores
    prompt = prompt_of(150, 11)
    # prefilling: abort on the prefill side before it finished
    prefill.add_request(Request("ab-prefilling", prompt, greedy(1), max_tokens=1, do_remote_decode=True))
    prefill.finish_requests(["ab-prefilling"])
    # queued on the decode side with a ticket, never scheduled: the lease is released at once
    params = prefill_ticket(prefill, "p-ab1", prompt)
    decode.add_request(decode_request("ab-queued", prompt, params, 5))
    decode.finish_requests(["ab-queued"])
    # transferring: one step starts the pull, the abort comes while it runs
    params = prefill_ticket(prefill, "p-ab2", prompt)
    decode.add_request(decode_request("ab-loading", prompt, params, 5))
    decode.step()
    assert decode.scheduler.loading or decode.has_unfinished_requests()
    decode.finish_requests(["ab-loading"])
    # decoding: abort after a few tokens
    params = prefill_ticket(prefill, "p-ab3", prompt)
    decode.add_request(decode_request("ab-decoding", prompt, params, 50))
    run_until([prefill, decode], lambda outs: len(tokens(outs, "ab-decoding")) >= 3 if "ab-decoding" in outs else False)
    expired = prefill.connector.sender.stats.leases_expired
    decode.finish_requests(["ab-decoding"])
    wait_idle(prefill, decode)
    assert prefill.connector.sender.stats.leases_expired == expired  # every lease was released


def test_a_worker_without_the_receiving_half_refuses_tickets(model_dir, cores):
    prefill, _, single = cores
    prompt = prompt_of(20, 12)
    params = prefill_ticket(prefill, "p-norecv", prompt)
    with pytest.raises(ValueError, match="does not accept remote KV"):
        single.add_request(decode_request("x", prompt, params, 3))
    with pytest.raises(ValueError, match="does not accept remote KV"):
        prefill.add_request(decode_request("y", prompt, params, 3))
    prefill.connector.sender._leases[params["lease_id"]].released = True
    wait_idle(prefill)


def test_ticket_signature_survives_a_json_round_trip_with_integer_lease(model_dir):
    import json

    from tandem.kv_transfer.ticket import prompt_hash

    prompt = prompt_of(20, 13)
    ticket = sign(Ticket(True, "tcp://127.0.0.1:1", "l", [0, 1], 20, 16, "c", prompt_hash(prompt), 30, 8), SECRET)
    params = json.loads(json.dumps(msgspec.to_builtins(ticket)))
    assert parse_ticket(params, SECRET, prompt).lease_s == 30.0


# -- shared memory (one host) ------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 17, 130])
def test_shared_memory_greedy_equals_single_core(shm_cores, length):
    prefill, decode, single = shm_cores
    assert prefill.runner.kv_region is not None  # the prefill worker's cache lives in a memfd
    prompt = prompt_of(length, 200 + length)
    grants, shm_loads = prefill.connector.sender.stats.shm_grants, decode.connector.stats.loads_shm
    params = prefill_ticket(prefill, f"sp{length}", prompt)
    decode.add_request(decode_request(f"sd{length}", prompt, params, 12))
    outs = run_until([prefill, decode], finished(f"sd{length}"))
    assert tokens(outs, f"sd{length}") == single_output(single, prompt, 12)
    wait_idle(prefill, decode)
    if length > 16:  # at least one full block to load
        assert prefill.connector.sender.stats.shm_grants == grants + 1
        assert decode.connector.stats.loads_shm == shm_loads + 1
    assert prefill.connector.sender.stats.leases_expired == 0  # released by the decode side


def test_unmappable_region_falls_back_to_tcp(shm_cores, monkeypatch):
    """As in another pid namespace: /proc/<pid>/fd of the prefill worker cannot be opened."""
    import tandem.kv_transfer.receiver as receiver_mod

    prefill, _, single = shm_cores
    decode = make_core(prefill.config.model.model, "decode")

    def unreachable(*_args):
        raise PermissionError("not in this pid namespace")

    monkeypatch.setattr(receiver_mod, "RemoteRegion", unreachable)
    try:
        for i in range(2):
            prompt = prompt_of(70, 310 + i)
            params = prefill_ticket(prefill, f"sp-fb{i}", prompt)
            decode.add_request(decode_request(f"sd-fb{i}", prompt, params, 6))
            outs = run_until([prefill, decode], finished(f"sd-fb{i}"))
            assert tokens(outs, f"sd-fb{i}") == single_output(single, prompt, 6)
        assert decode.connector.stats.loads_ok == 2 and decode.connector.stats.loads_shm == 0
        assert decode.connector.receiver._no_shm == {params["engine"]}
        wait_idle(prefill, decode)
    finally:
        decode.close()


def test_remote_region_checks_the_granted_token():
    import os

    from tandem.kv_transfer.shm import RemoteRegion, SharedKVRegion

    region = SharedKVRegion(4096)
    region.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    seen = RemoteRegion(os.getpid(), region.fd, region.token, 4096)
    assert seen.tensor[:4].tolist() == [1, 2, 3, 4]
    with pytest.raises(PermissionError):
        RemoteRegion(os.getpid(), region.fd, "0" * 32, 4096)  # a recycled fd or pid: another file
    with pytest.raises(PermissionError):
        RemoteRegion(os.getpid(), region.fd, region.token, 8192)
    with pytest.raises(OSError):
        RemoteRegion(os.getpid(), 10_000, region.token, 4096)


def test_copy_that_outlives_its_grant_is_discarded(model_dir):
    """A sender speaking the real wire protocol grants a read valid for 0 s: the receiver must
    not keep what it copied (the blocks may have been reused), and still releases the lease."""
    import zmq

    from tandem.kv_transfer.receiver import KVReceiver
    from tandem.kv_transfer.shm import SharedKVRegion, host_id, kv_region_layout
    from tandem.kv_transfer.ticket import prompt_hash
    from tandem.kv_transfer.wire import Pull, Release, ShmGrant, ToSender, WireCodec

    shape = (4, 16, 2, 8)
    region = SharedKVRegion(kv_region_layout(shape[1:], 4, [torch.float32] * 2)[1])
    remote_caches = region.layer_views(shape[1:], 4, [torch.float32] * 2)
    for k, v in remote_caches:
        k.fill_(1.0)
        v.fill_(2.0)
    local = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    from tandem.kv_transfer.wire import KV_TRANSFER_CHANNEL
    from tandem.zmq_auth import release, require_secret

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # stands in for the prefill worker's sender: the same login
    require_secret(router, SECRET, KV_TRANSFER_CHANNEL)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    config = KVTransferConfig(role="decode", secret=SECRET, lease_s=5.0, transfer_timeout_s=2.0)
    receiver = KVReceiver(config, local, "compat", ctx)
    codec = WireCodec(SECRET, ToSender)
    try:
        ticket = Ticket(True, f"tcp://127.0.0.1:{port}", "lease-1", [1, 2], 20, 16, "compat", prompt_hash([1]), 5.0, 8)
        for valid_s, expect_ok in ((0.0, False), (30.0, True)):
            receiver.load(f"r{valid_s}", ticket, [1, 2], [0, 3])
            ident, *frames = router.recv_multipart()
            pull, _ = codec.decode(frames)
            assert isinstance(pull, Pull) and pull.host == host_id() and pull.block_ids == [1, 2]
            grant = ShmGrant("lease-1", region.pid, region.fd, region.token, region.nbytes, 4, valid_s)
            router.send_multipart([ident, *WireCodec(SECRET, ToSender).encode(grant)])
            deadline = time.monotonic() + 5
            results = []
            while not results:
                assert time.monotonic() < deadline
                results = receiver.take_results()
                time.sleep(0.01)
            assert results[0].ok is expect_ok
            assert expect_ok or results[0].kind == "lease_expired"
            while True:  # the lease is released whatever the outcome (heartbeats may come first)
                msg, _ = codec.decode(router.recv_multipart()[1:])
                if isinstance(msg, Release):
                    break
        assert local[1][0][3].eq(1.0).all() and local[1][1][0].eq(2.0).all()
    finally:
        receiver.close()
        release(router)
        router.close(0)
        ctx.term()


# -- concurrent legs: the decode leg holds a router-signed pending ticket before the prefill ran ---------------
def pending_params(prefill: EngineCore, lease_id: str, prompt: list[int], secret: bytes = SECRET) -> dict:
    """What a router signs before sending both legs (it learned the rest from an earlier ticket)."""
    from tandem.kv_transfer.ticket import prompt_hash

    c = prefill.connector
    ticket = Ticket(True, c.sender.endpoint, lease_id, [], len(prompt), c.block_size, c.compat, prompt_hash(prompt),
                    c.config.lease_s, c.kv_bytes_per_token, pending=True)
    return msgspec.to_builtins(sign(ticket, secret))


def prefill_leg(rid: str, prompt: list[int], lease_id: str) -> Request:
    return Request(rid, prompt, greedy(1), max_tokens=1, do_remote_decode=lease_id)


def step_for(cores, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in cores:
            c.step()
        time.sleep(0.005)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_concurrent_legs_decode_first_then_prefill(request, transport):
    prefill, decode, single = request.getfixturevalue("cores" if transport == "tcp" else "shm_cores")
    expired = prefill.connector.sender.stats.leases_expired
    for length in (40, 130):
        lid = f"{length:032x}"
        prompt = prompt_of(length, 400 + length)
        decode.add_request(decode_request(f"cd{length}", prompt, pending_params(prefill, lid, prompt), 10))
        step_for([decode, prefill], 0.3)  # the pull is parked on the prefill worker: it has no such lease yet
        assert f"cd{length}" in decode.scheduler.loading
        prefill.add_request(prefill_leg(f"cp{length}", prompt, lid))
        outs = run_until([prefill, decode], finished(f"cd{length}", f"cp{length}"))
        assert tokens(outs, f"cd{length}") == single_output(single, prompt, 10)
        assert outs[f"cp{length}"][-1].kv_transfer_params["lease_id"] == lid
        wait_idle(prefill, decode)
    assert prefill.connector.sender.stats.leases_expired == expired


def test_concurrent_prefill_aborted_decode_prefills_locally(cores):
    """The decode worker's policy is fail, but a prefill that never happened is not a failed transfer."""
    prefill, decode, single = cores
    lid, prompt = "a" * 32, prompt_of(70, 410)
    recomputed = decode.connector.stats.recomputed
    decode.add_request(decode_request("cd-ab", prompt, pending_params(prefill, lid, prompt), 6))
    prefill.add_request(prefill_leg("cp-ab", prompt, lid))
    prefill.finish_requests(["cp-ab"])
    outs = run_until([prefill, decode], finished("cd-ab"))
    assert tokens(outs, "cd-ab") == single_output(single, prompt, 6)
    assert decode.connector.stats.recomputed == recomputed + 1
    wait_idle(prefill, decode)


def test_concurrent_prefill_that_never_arrives(cores, monkeypatch):
    import tandem.kv_transfer.sender as sender_mod

    monkeypatch.setattr(sender_mod, "PARK_GRACE_S", 0.3)
    prefill, decode, single = cores
    prompt = prompt_of(50, 420)
    decode.add_request(decode_request("cd-none", prompt, pending_params(prefill, "b" * 32, prompt), 5))
    outs = run_until([prefill, decode], finished("cd-none"))
    assert tokens(outs, "cd-none") == single_output(single, prompt, 5)
    wait_idle(prefill, decode)


def test_concurrent_decode_aborted_while_parked_releases_the_later_lease(cores):
    prefill, decode, _ = cores
    lid, prompt = "c" * 32, prompt_of(60, 430)
    decode.add_request(decode_request("cd-gone", prompt, pending_params(prefill, lid, prompt), 5))
    prefill.add_request(prefill_leg("cp-gone", prompt, lid))  # expected from here on
    step_for([decode], 0.2)
    decode.finish_requests(["cd-gone"])
    expired = prefill.connector.sender.stats.leases_expired
    run_until([prefill, decode], finished("cp-gone"))
    wait_idle(prefill, decode)  # the lease was released as soon as it existed: no 5 s expiry
    assert prefill.connector.sender.stats.leases_expired == expired


def test_concurrent_decode_aborted_before_the_prefill_leg_arrived_releases_the_later_lease(cores):
    """The client left so early that the decode worker's release reaches the prefill worker before
    its prefill leg does: the release is remembered and the lease ends as soon as it exists."""
    prefill, decode, _ = cores
    lid, prompt = "f" * 32, prompt_of(60, 450)
    decode.add_request(decode_request("cd-early", prompt, pending_params(prefill, lid, prompt), 5))
    step_for([decode], 0.1)
    decode.finish_requests(["cd-early"])
    step_for([decode, prefill], 0.3)  # the release arrives at a worker that has not heard of the lease
    expired = prefill.connector.sender.stats.leases_expired
    prefill.add_request(prefill_leg("cp-early", prompt, lid))
    run_until([prefill, decode], finished("cp-early"))
    wait_idle(prefill, decode)
    assert prefill.connector.sender.stats.leases_expired == expired


def test_concurrent_legs_guard_their_lease_ids_and_prompt(cores):
    prefill, decode, single = cores
    prompt = prompt_of(40, 440)
    prefill.add_request(prefill_leg("cp-dup1", prompt, "d" * 32))
    with pytest.raises(ValueError, match="in use"):
        prefill.add_request(prefill_leg("cp-dup2", prompt, "d" * 32))
    run_until([prefill], finished("cp-dup1"))
    # a decode leg whose pending ticket is for another prompt than the one prefilled: recomputed locally
    other = prompt_of(40, 441)
    decode.add_request(decode_request("cd-other", other, pending_params(prefill, "d" * 32, other), 4))
    outs = run_until([prefill, decode], finished("cd-other"))
    assert tokens(outs, "cd-other") == single_output(single, other, 4)
    with pytest.raises(TicketError, match="names no blocks"):
        parse_ticket(resigned(pending_params(prefill, "e" * 32, prompt), block_ids=[1]), SECRET, prompt)
    wait_idle(prefill, decode)  # the failed pull released the lease it named


@pytest.mark.parametrize("abort", [False, True])
def test_blocks_stream_while_the_prefill_runs(model_dir, cores, abort):
    """A 16-token budget makes the 130-token prompt a 9-step prefill; a parked TCP pull receives
    each full block as its chunk completes, before the lease exists. An abort mid-stream makes the
    decode worker prefill locally (what it got so far is thrown away)."""
    _, decode, single = cores
    prefill = make_core(model_dir, "prefill", budget=16)
    try:
        lid, prompt = f"{0xf0 + abort:032x}", prompt_of(130, 600 + abort)
        recomputed, loaded = decode.connector.stats.recomputed, decode.connector.stats.loads_ok
        decode.add_request(decode_request("sd-stream", prompt, pending_params(prefill, lid, prompt), 8))
        step_for([decode], 0.2)  # the pull is parked on the prefill worker
        prefill.add_request(prefill_leg("sp-stream", prompt, lid))
        for _ in range(5):  # 80 tokens: 5 full blocks computed
            prefill.step()
            step_for([decode], 0.05)
        assert prefill.has_unfinished_requests()  # still prefilling ...
        assert prefill.connector.sender.stats.streamed_blocks >= 4  # ... and most of it already sent
        if abort:
            prefill.finish_requests(["sp-stream"])
        outs = run_until([prefill, decode], finished("sd-stream"))
        assert tokens(outs, "sd-stream") == single_output(single, prompt, 8)
        if abort:
            assert decode.connector.stats.recomputed == recomputed + 1
        else:
            assert decode.connector.stats.loads_ok == loaded + 1
        wait_idle(prefill, decode)
    finally:
        prefill.close()


# -- review findings: each of these hung, leaked or failed before its fix ---------------------------------
def _small_decode_core(model_dir, mem: str = "32KiB", **kv) -> EngineCore:
    """A decode worker with a tiny cache (32 KiB: 4 blocks of 16 tokens)."""
    transfer = KVTransferConfig(role="decode", secret=SECRET, lease_s=5.0, transfer_timeout_s=2.0, **kv)
    config = EngineConfig(ModelConfig(str(model_dir)), CacheConfig(block_size=16, kv_cache_memory=mem),
                          SchedulerConfig(max_num_batched_tokens=256), kv_transfer=transfer)
    return EngineCore(config)


def test_loads_that_fill_the_decode_cache_do_not_deadlock(model_dir, cores):
    """Two 33-token prompts on a 4-block decode worker: each load holds the blocks of its whole
    prompt, so a loaded request is admitted without asking for one more block."""
    prefill, _, single = cores
    decode = _small_decode_core(model_dir, transport="tcp")
    try:
        prompts = [prompt_of(33, 900 + i) for i in range(2)]
        for i, p in enumerate(prompts):
            decode.add_request(decode_request(f"dl{i}", p, prefill_ticket(prefill, f"pl{i}", p), 4))
        outs = run_until([prefill, decode], finished("dl0", "dl1"), timeout_s=20)
        assert [tokens(outs, f"dl{i}") for i in range(2)] == [single_output(single, p, 4) for p in prompts]
        wait_idle(prefill, decode)
    finally:
        decode.close()


def test_a_ticket_redeemed_twice_on_one_worker_is_refused(cores):
    prefill, decode, single = cores
    prompt = prompt_of(120, 55)
    ticket = prefill_ticket(prefill, "p-dup", prompt)
    decode.add_request(decode_request("d-dup1", prompt, ticket, 4))
    with pytest.raises(ValueError, match="already being redeemed"):
        decode.add_request(decode_request("d-dup2", prompt, ticket, 4))
    outs = run_until([prefill, decode], finished("d-dup1"))
    assert tokens(outs, "d-dup1") == single_output(single, prompt, 4)
    wait_idle(prefill, decode)


def test_a_reused_request_id_releases_its_own_ticket(model_dir, cores):
    """Abort r while it loads, add a new r with another ticket, abort that one while queued: the
    second ticket is released too (it was skipped as if it were the orphaned load's)."""
    prefill, decode, _ = cores
    prompt = prompt_of(120, 77)
    decode.add_request(decode_request("r-reuse", prompt, prefill_ticket(prefill, "p-reuse1", prompt), 4))
    decode.step()
    assert "r-reuse" in decode.scheduler.loading
    decode.finish_requests(["r-reuse"])
    decode.add_request(decode_request("r-reuse", prompt, prefill_ticket(prefill, "p-reuse2", prompt), 4))
    decode.finish_requests(["r-reuse"])
    expired = prefill.connector.sender.stats.leases_expired
    wait_idle(prefill, decode, timeout_s=4)  # a lease kept alive by heartbeats never gets here
    assert prefill.connector.sender.stats.leases_expired == expired


def test_a_shared_memory_grant_after_a_long_park_is_accepted(model_dir):
    """The pull waited on the prefill worker longer than a lease before the prefill ran: the grant
    counts its validity from when it was sent, not from when the pull was."""
    prefill, decode = make_core(model_dir, "prefill", lease_s=1.0), make_core(model_dir, "decode")
    try:
        lid, prompt = "9" * 32, prompt_of(70, 321)
        decode.add_request(decode_request("cd-park", prompt, pending_params(prefill, lid, prompt), 5))
        step_for([decode, prefill], 1.5)
        prefill.add_request(prefill_leg("cp-park", prompt, lid))
        outs = run_until([prefill, decode], finished("cd-park", "cp-park"))
        assert outs["cd-park"][-1].finish_reason == "length", outs["cd-park"][-1].error
        assert decode.connector.stats.loads_shm == 1  # a fresh decode core: this pull is its only one
        wait_idle(prefill, decode)
    finally:
        for core in (prefill, decode):
            core.close()


def test_the_receiver_never_blocks_on_a_peer_that_does_not_read(model_dir):
    """Messages to an endpoint nobody serves fill its queue; the receiver drops the rest instead
    of blocking its thread (which would stop every load on the worker)."""
    from tandem.kv_transfer.wire import Release

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    core = make_core(model_dir, "decode", transport="tcp")
    try:
        receiver = core.connector.receiver
        receiver._stopped = True
        receiver._thread.join(2)
        sent = [receiver._send(dead, Release(f"{i:032x}")) for i in range(1500)]
        assert sent[0] and not sent[-1]
    finally:
        core.close()


def test_a_release_does_not_free_blocks_another_shared_memory_reader_still_copies(model_dir, cores):
    """The same ticket redeemed on two decode workers on this host (a replay): the first one's
    release must not free the blocks while the second still holds a grant to copy them."""
    single = cores[2]
    prefill = make_core(model_dir, "prefill")
    first, second = make_core(model_dir, "decode"), make_core(model_dir, "decode")
    try:
        prompt = prompt_of(40, 31)
        ticket = prefill_ticket(prefill, "p-two", prompt)
        gate, entered = threading.Event(), threading.Event()
        receiver = second.connector.receiver
        read = receiver._read_shm

        def late_read(load, grant):  # the second reader starts copying late
            entered.set()
            gate.wait(10)
            return read(load, grant)

        receiver._read_shm = late_read
        second.add_request(decode_request("d-late", prompt, ticket, 6))
        second.step()
        assert entered.wait(5)
        first.add_request(decode_request("d-first", prompt, ticket, 6))
        outs = run_until([prefill, first], finished("d-first"))
        step_for([prefill], 0.2)
        assert prefill.connector.num_leases == 1  # released by one reader, still granted to the other
        gate.set()
        outs |= run_until([prefill, second], finished("d-late"))
        want = single_output(single, prompt, 6)
        assert tokens(outs, "d-first") == want and tokens(outs, "d-late") == want
        wait_idle(prefill, first, second)
    finally:
        gate.set()
        for core in (prefill, first, second):
            core.close()


def test_heartbeats_stop_extending_a_lease_after_its_maximum_hold(model_dir, recompute_decode):
    """A decode worker that keeps a ticket waiting for longer than the prefill worker's maximum
    hold loses the lease (the prefill worker's blocks are not held for ever) and, under policy
    recompute, prefills the prompt itself."""
    prefill = make_core(model_dir, "prefill", lease_s=0.3, max_hold_s=0.8)
    try:
        prompt = prompt_of(50, 6)
        recomputed = recompute_decode.connector.stats.recomputed
        recompute_decode.add_request(decode_request("d-max", prompt, prefill_ticket(prefill, "p-max", prompt), 5))
        deadline = time.monotonic() + 1.6  # heartbeats arrive, but the decode side never steps
        while time.monotonic() < deadline:
            prefill.step()
            time.sleep(0.02)
        assert prefill.connector.sender.stats.leases_expired == 1
        outs = run_until([prefill, recompute_decode], finished("d-max"))
        assert len(tokens(outs, "d-max")) == 5
        assert recompute_decode.connector.stats.recomputed == recomputed + 1
        wait_idle(prefill, recompute_decode)
    finally:
        prefill.close()
