"""Shared fixtures: tiny random HF models built once per session, engines that must end idle."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through Triton's interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem import LLM
from tandem.testing import PRESETS, build_preset

torch.set_num_threads(min(2, torch.get_num_threads()))


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


ALL_PRESETS = sorted(PRESETS)
