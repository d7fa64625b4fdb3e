"""Small helpers shared by the engine, the runner and the KV hand-off (a leaf: imports nothing of ours)."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b: how many blocks of b hold a tokens."""
    return -(-a // b)


def drain(q: queue.Queue[T] | queue.SimpleQueue[T]) -> list[T]:
    """Everything in ``q`` now, without waiting."""
    out: list[T] = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
