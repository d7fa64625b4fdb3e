"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that started it exits
    (Linux only; False elsewhere or on failure). Safe to call in a ``preexec_fn``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def terminate_with_parent() -> None:
    """preexec_fn for workers: SIGTERM (drain and exit) when the launcher dies, however it dies."""
    set_parent_death_signal(signal.SIGTERM)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so ``finally`` blocks (stopping children) run
    even before an event loop installs its own handler."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
