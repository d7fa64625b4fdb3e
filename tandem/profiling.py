"""Named spans for ``tandem bench latency --profile`` (tandem/bench/profile.py). A span costs one
flag check when no torch profiler is running (a ``record_function`` costs ~12 us even then)."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

SPAN_PREFIX = "tandem::"


def span(name: str) -> contextlib.AbstractContextManager:
    """``with span("schedule"):`` marks a phase of a step in a running torch.profiler trace."""
    return record_function(SPAN_PREFIX + name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()
