"""Hardening of the KV side channels against peers without the fleet's secret (issue 17).

KV events: never published unsigned (they carry the token ids of cached prompt blocks).
KV transfer: the prefill worker's sender drops oversized or unsigned frames without growing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_server import _free_port


def _cli(*argv: str, env_drop: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-m", "tandem.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- item 8: KV events ------------------------------------------------------------------------------------
def test_serve_refuses_kv_events_without_secret(model_dirs):
    """Before the fix this started a server publishing token ids unsigned (the run timed out)."""
    port = _free_port()
    for flag in ("--kv-events-endpoint", "--kv-events-replay-endpoint"):
        out = _cli("serve", str(model_dirs["llama3-gqa"]), "--port", str(port), "--kv-cache-memory", "8MiB",
                   flag, f"tcp://127.0.0.1:{_free_port()}", env_drop=("TANDEM_KV_EVENTS_SECRET",))
        assert out.returncode == 2, out.stderr[-2000:]
        assert "TANDEM_KV_EVENTS_SECRET" in out.stderr


def test_router_refuses_unsigned_kv_events():
    """A router without the secret would take any batch on the events socket as true."""
    spec = f"http://127.0.0.1:{_free_port()},events=tcp://127.0.0.1:{_free_port()}"
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
        launch._start_workers("model", roles, [], secret)  # noqa: SLF001
        assert len(started) == 2
        for cmd, env in started:
            assert "--kv-events-endpoint" in cmd
            assert env["TANDEM_KV_EVENTS_SECRET"] == secret
