"""Keep glibc from returning large freed blocks to the OS between model steps (CPU only).

Every step allocates activations of tens of megabytes. glibc serves those with fresh mmap pages
that are zero-filled on first touch and unmapped on free, so each step pays page faults again;
on a 2-core machine that measured ~28% of a 2048-token prefill step. Raising the mmap and trim
thresholds makes freed activations reusable heap memory. Process-wide and idempotent; set
``TANDEM_CPU_MALLOPT=0`` to leave the allocator alone (e.g. when LD_PRELOAD-ing tcmalloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 30  # older glibc caps this at 32 MiB and refuses more: then we do nothing
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # the largest C int: keep up to 2 GiB of freed heap
_applied = False


def tune_glibc_malloc() -> bool:
    """Returns True when the thresholds were set (now or by an earlier call)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("TANDEM_CPU_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    _applied = ok
    if not ok:
        logger.debug("mallopt refused the thresholds; allocator left as is")
    return ok
