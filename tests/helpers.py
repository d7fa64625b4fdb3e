"""What tests share: start a real `tandem serve`, wait for a condition, read a Prometheus metric."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from tandem.config import SchedulerConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request
from tandem.engine.scheduler import Scheduler
from tandem.sampling_params import SamplingParams
from tandem.testing import PRESETS

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


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


def start_server(model_dir, *extra: str, env: dict[str, str] | None = None, timeout_s: float = 120.0,
                 served_names: tuple[str, ...] = ("tiny",)) -> tuple[subprocess.Popen, str]:
    """`tandem serve MODEL` on a free port, served as "tiny" (``served_names=()``: the default names);
    returns (process, base URL)."""
    port = free_port()
    names = ["--served-model-name", *served_names] if served_names else []
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", str(model_dir), "--port", str(port),
                             "--kv-cache-memory", "8MiB", *names, *extra],
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


# -- processes (Linux: /proc) ------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc/*/stat (field 4 is the parent pid)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def engine_core_pid(api_pid: int) -> int:
    """The multiprocessing (spawn) child that runs the engine core; not the resource tracker."""
    cores = [c for c in children(api_pid)
             if "multiprocessing" in cmdline(c) and "resource_tracker" not in cmdline(c)]
    assert len(cores) == 1, [(c, cmdline(c)) for c in children(api_pid)]
    return cores[0]


# -- models and references ----------------------------------------------------------------------
ALL_PRESETS = sorted(PRESETS)

PROMPT_LENGTHS = [1, 5, 16, 17, 40, 71]


@functools.cache
def hf_model(path: str):
    from transformers import AutoModelForCausalLM  # heavy: only where a test compares

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate, greedy, stopping at EOS like tandem does."""
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=2, eos_token_id=1)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(1) + 1] if 1 in tokens else tokens


# -- the scheduler alone ------------------------------------------------------------------------
def make_sched(num_blocks=64, block_size=4, budget=32, max_seqs=8, policy="fcfs", caching=True, max_len=256):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy),
                     kv, max_model_len=max_len)


def make_req(rid, n_prompt, max_tokens=4, priority=0, arrival=None, parent=None, first_token=0):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(first_token, first_token + n_prompt)), params, priority=priority,
                   arrival_time=arrival, parent_id=parent, max_tokens=max_tokens)
