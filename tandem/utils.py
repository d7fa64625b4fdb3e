"""Small arithmetic shared by the engine, the runner and the KV hand-off (a leaf: imports nothing of ours)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b: how many blocks of b hold a tokens."""
    return -(-a // b)
