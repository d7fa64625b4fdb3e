"""Shared-memory transport for workers on one host: the prefill worker keeps its whole KV cache in
an anonymous memfd, and a decode worker on the same host maps it read-only and copies the leased
blocks straight into its own cache: one copy, no sockets for the bytes.

How a decode worker reaches the region: through ``/proc/<pid>/fd/<fd>`` of the prefill process
(same user, same host, same pid namespace). The memfd's name carries a random token that the
signed grant repeats, and the receiver checks it on the file it opened, so a recycled pid or fd
cannot hand it somebody else's memory. The region is freed by the kernel when the prefill process
and every mapping of it are gone: a killed worker leaks nothing in /dev/shm.

NOTE (lease invariant, shared-memory form): the decode side reads the prefill worker's blocks
itself, so it must finish reading before the lease can end. The grant says how long the lease is
guaranteed to live from the moment it was issued (``valid_s``); the receiver counts that from the
moment it sent its pull (which is earlier) and discards the copy when it finished later.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch

MEMFD_PREFIX = "tandem-kv-"


@lru_cache(maxsize=1)
def host_id() -> str:
    """Equal for two processes on one booted kernel; a pull carries it to ask for shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""  # not Linux: no shared-memory transport


REGION_ALIGN = 64  # bytes: every layer's K and V start on a cache line, whatever the dtypes before them


def kv_region_layout(block_shape: Sequence[int], num_blocks: int, dtypes: Sequence[torch.dtype],
                     per_layer: int = 2) -> tuple[list[int], int]:
    """(byte offset of every layer's K and V: layer i's K at 2i, V at 2i + 1; the region's size).
    Each is ``[num_blocks, *block_shape]`` in its layer's dtype (layers may differ: an FP8 cache
    with skipped layers). per_layer 1: one tensor per layer (MLA's latent, bound as K and V).
    Both ends of a transfer derive the layout from the same spec."""
    elems = num_blocks * math.prod(block_shape)
    offsets, at = [], 0
    for dtype in dtypes:
        size = elems * torch.empty(0, dtype=dtype).element_size()
        for _ in range(per_layer):
            offsets.append(at)
            at += -(-size // REGION_ALIGN) * REGION_ALIGN
    return offsets, at


def _layer_views(tensor: torch.Tensor, block_shape: Sequence[int], num_blocks: int, dtypes: Sequence[torch.dtype],
                 per_layer: int) -> list[tuple[torch.Tensor, ...]]:
    offsets, _ = kv_region_layout(block_shape, num_blocks, dtypes, per_layer)
    nbytes = [num_blocks * math.prod(block_shape) * torch.empty(0, dtype=d).element_size() for d in dtypes]

    def view(i: int) -> torch.Tensor:
        layer = i // per_layer
        return tensor[offsets[i]:offsets[i] + nbytes[layer]].view(dtypes[layer]).view(num_blocks, *block_shape)

    return [tuple(view(per_layer * i + j) for j in range(per_layer)) for i in range(len(dtypes))]


class SharedKVRegion:
    """One memfd holding every layer's K and V (``kv_region_layout``). Created before the model's
    KV cache, which is views of it."""

    def __init__(self, nbytes: int) -> None:
        self.token = secrets.token_hex(16)
        self.nbytes = nbytes
        self.fd = os.memfd_create(MEMFD_PREFIX + self.token, os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, nbytes)  # reserve now: ENOSPC here, not SIGBUS later
            self._map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pid = os.getpid()

    def layer_views(self, block_shape: Sequence[int], num_blocks: int, dtypes: Sequence[torch.dtype],
                    per_layer: int = 2) -> list[tuple[torch.Tensor, ...]]:
        """Every layer's (K, V) cache (or its one tensor), ``[num_blocks, *block_shape]`` in that layer's dtype."""
        return _layer_views(self.tensor, block_shape, num_blocks, dtypes, per_layer)


def try_shared_region(nbytes: int) -> SharedKVRegion | None:
    """A region, or None where memfds or enough shared memory are not available."""
    if not hasattr(os, "memfd_create") or not host_id():
        return None
    try:
        return SharedKVRegion(nbytes)
    except OSError:
        return None


class RemoteRegion:
    """A read-only mapping of another process's SharedKVRegion."""

    def __init__(self, pid: int, fd: int, token: str, nbytes: int) -> None:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            name = os.readlink(f"/proc/self/fd/{own}")
            if MEMFD_PREFIX + token not in name or os.fstat(own).st_size != nbytes:
                raise PermissionError(f"/proc/{pid}/fd/{fd} is not the granted KV region")
            self._map = mmap.mmap(own, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(own)
        self.token = token
        with warnings.catch_warnings():  # a read-only buffer: this tensor is only ever read
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    def layers(self, block_shape: Sequence[int], num_blocks: int, dtypes: Sequence[torch.dtype],
               per_layer: int = 2) -> list[tuple[torch.Tensor, ...]]:
        return _layer_views(self.tensor, block_shape, num_blocks, dtypes, per_layer)
