"""What tests share: start a real `tandem serve`, wait for a condition, read a Prometheus metric."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "") -> T:
    """Poll ``cond`` until it returns something truthy; return it, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what or cond}"
        time.sleep(interval_s)


def start_server(model_dir, *extra: str, env: dict[str, str] | None = None,
                 timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`tandem serve MODEL` on a free port, served as "tiny"; returns (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", str(model_dir), "--port", str(port),
                             "--kv-cache-memory", "8MiB", "--served-model-name", "tiny", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout_s, 0.3, "the server's /health")
    except BaseException:
        proc.kill()
        raise
    return proc, base


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Wait for ``url``'s /health to answer 200; fail at once if ``proc`` (the process serving it) exits."""

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s, 0.3, f"{url}/health")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric_sum(text: str, name: str, label: str = "") -> float:
    """Sum of the samples of every metric whose name starts with ``name`` and whose line holds ``label``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_idle(base: str) -> bool:
    text = httpx.get(f"{base}/metrics").text
    return all(metric(text, m) == 0 for m in
               ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))


def api_idle(base: str, headers: dict | None = None) -> bool:
    """Idle in the core (nothing running or waiting, no block held) and in the API process (no
    sequence in flight, no request tracked, every accepted request ended exactly once)."""
    text = httpx.get(f"{base}/metrics", headers=headers).text
    return (server_idle(base) and metric(text, "tandem:api_sequences_in_flight") == 0
            and metric(text, "tandem:api_requests_tracked") == 0
            and metric(text, "tandem:api_requests_accepted_total") == metric(text, "tandem:api_requests_ended_total"))
