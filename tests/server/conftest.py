"""The `tandem serve` most server tests share: the llama3-gqa preset, served as "tiny"."""

from __future__ import annotations

import pytest

from tests.helpers import start_server, stop_server


@pytest.fixture(scope="module")
def server(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"])
    yield base
    stop_server(proc)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
