"""Process boundaries of `tandem serve`: the engine-core child never outlives its API process,
however that process dies (here: SIGKILL, which runs no cleanup of its own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import children, cmdline, engine_core_pid, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

EXIT_DEADLINE_S = 10.0


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper (that is gone as far as we care)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _wait_gone(pid: int, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


@pytest.fixture
def serve(model_dirs, tmp_path):
    """Start `tandem serve` with its output in a file (a pipe nobody reads could block the
    orphaned core's logging, which is not what these tests are about); kill what is left after."""
    started: list[tuple[subprocess.Popen, int]] = []

    def _start(*extra: str) -> tuple[subprocess.Popen, str, int]:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", str(model_dirs["llama3-gqa"]),
                                 "--port", str(port), "--kv-cache-memory", "8MiB", "--served-model-name", "tiny",
                                 *extra], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            assert time.monotonic() < deadline, "server not ready"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        core = engine_core_pid(proc.pid)
        started.append((proc, core))
        return proc, base, core

    yield _start
    for proc, core in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if _alive(core):
            os.kill(core, signal.SIGKILL)


def test_engine_core_exits_when_idle_api_process_is_killed(serve):
    proc, base, core = serve()
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
    assert httpx.post(f"{base}/v1/completions", json=body).status_code == 200
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_gone(core, EXIT_DEADLINE_S), f"engine core {core} alive {EXIT_DEADLINE_S} s after its parent died"


def test_engine_core_exits_when_busy_api_process_is_killed(serve):
    """Killed mid-generation: 256 sequences of ~480 tokens keep the core stepping far longer than
    the deadline, so only a parent check on the busy path (or the kernel's) can end it in time."""
    proc, base, core = serve()
    body = {"model": "tiny", "prompt": [[10 + i, 20 + i, 30 + i] for i in range(16)], "n": 16, "max_tokens": 480,
            "ignore_eos": True, "stream": True}
    first_chunk = threading.Event()

    def _generate() -> None:
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    first_chunk.set()
        except httpx.HTTPError:  # the server is killed under us
            pass
        first_chunk.set()

    client = threading.Thread(target=_generate, daemon=True)
    client.start()
    assert first_chunk.wait(60)
    assert proc.poll() is None, "the generation must still be running when the API process dies"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_gone(core, EXIT_DEADLINE_S), f"engine core {core} alive {EXIT_DEADLINE_S} s after its parent died"
    client.join(10)


def test_blocked_send_gives_up_when_parent_is_gone():
    """A PUSH whose reader died blocks once its queue is full; the core's send checks the parent
    meanwhile instead of waiting for ever (the portable path, without PR_SET_PDEATHSIG)."""
    import zmq

    from tandem.engine.core_proc import ParentGone, ParentWatch, send

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect("ipc:///nonexistent-tandem-test/out")  # nobody will ever read
        alive, dead = ParentWatch(os.getppid()), ParentWatch(-1)
        send(push, [b"x"], alive)  # queued
        with pytest.raises(ParentGone):
            send(push, [b"y"], dead)
        with pytest.raises(ParentGone):
            ParentWatch(-1).check()
        alive.check()
    finally:
        push.close(0)
        ctx.term()


def _up(model_dirs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", str(model_dirs["llama3-gqa"]), "--replicas",
                             "2", "--port", str(free_port()), "--worker-args", "--kv-cache-memory 8MiB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _workers_of(up: subprocess.Popen, count: int = 2) -> list[int]:
    deadline = time.monotonic() + 60
    while len(workers := [c for c in children(up.pid) if " serve " in cmdline(c)]) < count:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(workers) == count, [cmdline(c) for c in children(up.pid)]
    return workers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tandem_up_stopped_while_its_workers_start_leaves_none_behind(model_dirs, sig):
    """SIGTERM before the router runs still stops the workers (its finally runs); SIGKILL, which
    runs nothing, reaches them through the parent-death signal."""
    up = _up(model_dirs)
    workers = _workers_of(up)
    up.send_signal(sig)
    up.wait(60)
    try:
        for pid in workers:
            assert _wait_gone(pid, 40.0), f"worker {pid} outlived tandem up ({sig.name})"
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
