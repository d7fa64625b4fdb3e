"""Shared fixtures: tiny random HF models built once per session, engines that must end idle."""

from __future__ import annotations

import faulthandler
import os
import secrets
import signal
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through Triton's interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem import LLM
from tandem.testing import build_preset
from tests.helpers import free_port, start_server, stop_server, wait_healthy

torch.set_num_threads(min(2, torch.get_num_threads()))

# A crash of the test process itself (abort, segfault) leaves the test it was in and every thread's
# stack in these files; `make test` prints them (CI shows only the end of the output).
RUNNING_TEST_FILE, CRASH_LOG_FILE = ".pytest-running", ".pytest-crash.log"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("faulthandler"):  # `make test` turns pytest's own off
        config._crash_log = open(CRASH_LOG_FILE, "w")  # type: ignore[attr-defined]  # noqa: SIM115 - lives as long as the session
        faulthandler.enable(file=config._crash_log, all_threads=True)  # type: ignore[attr-defined]


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    with open(RUNNING_TEST_FILE, "w") as f:
        f.write(nodeid + "\n")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict:
    """Preset name -> model directory, built lazily and once."""
    cache: dict = {}

    class _Dirs(dict):
        def __missing__(self, name):
            cache[name] = build_preset(name, tmp_path_factory.mktemp(name))
            self[name] = cache[name]
            return cache[name]

    return _Dirs()


@pytest.fixture
def make_llm(model_dirs):
    """Build LLM engines; after the test every one of them must hold no request and no block."""
    engines: list[LLM] = []

    def _make(preset: str = "llama3-gqa", **kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory", "8MiB")
        llm = LLM(model=str(model_dirs[preset]), **kwargs)
        engines.append(llm)
        return llm

    yield _make
    for llm in engines:
        llm.llm_engine.assert_idle()




@pytest.fixture(scope="module")
def fleet(model_dirs):
    """Two workers publishing KV events and a `tandem router` (cache-aware) in front."""
    secret = secrets.token_hex(16)
    os.environ["TANDEM_KV_EVENTS_SECRET"] = secret
    model = model_dirs["llama3-gqa"]
    workers, specs = [], []
    try:
        for _ in range(2):
            events, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            proc, base = start_server(model, "--kv-events-endpoint", events, "--kv-events-replay-endpoint", replay,
                                       "--max-num-seqs", "8", "--enable-tokenizer-info-endpoint")
            workers.append(proc)
            specs.append(f"{base},events={events},replay={replay}")
        port = free_port()
        cmd = [sys.executable, "-m", "tandem.cli", "router", "--port", str(port), "--tokenizer", str(model),
               "--seed", "0"] + [arg for s in specs for arg in ("--worker", s)]
        router = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, router)
        yield url, workers, [s.split(",")[0] for s in specs]
        router.send_signal(signal.SIGTERM)
        router.wait(30)
    finally:
        os.environ.pop("TANDEM_KV_EVENTS_SECRET", None)
        for w in workers:
            stop_server(w)
