"""The disk tier's file format: one KV block per file, self-describing and checked before use.

A file is ``MAGIC``, a 4-byte little-endian header length, a msgpack ``BlockHeader`` and the block's
bytes (the host tier's row: every layer's K then V, ``connector.BlockLayout``). The header names the
compatibility hash (model, weights, dtype, block size, layout, cache dtypes and scales): a file
whose hash differs from this engine's is foreign and never loaded. The payload's blake2b digest is
checked on every read; a file that fails is reported and deleted by the caller, never loaded.
Files are written to a temporary name and renamed, so a crash leaves no half-written ``.kvb``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

logger = logging.getLogger(__name__)

MAGIC = b"TANDEMKV1\n"
STALE_TMP_S = 600.0  # a temporary file this old was left by a writer that died
SUFFIX = ".kvb"
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 20


class BlockHeader(msgspec.Struct, forbid_unknown_fields=True):
    compat: str
    block_hash: bytes
    token_ids: list[int]
    num_bytes: int
    digest: bytes  # blake2b-128 of the payload


class CorruptBlockFile(Exception):
    """A file that must not be loaded (bad magic, header, size or checksum; another model's)."""


def digest(payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def block_path(root: Path, block_hash: bytes) -> Path:
    return root / f"{block_hash.hex()}{SUFFIX}"


def write_block(root: Path, compat: str, block_hash: bytes, token_ids: list[int], payload: memoryview) -> None:
    header = msgspec.msgpack.encode(BlockHeader(compat, block_hash, token_ids, len(payload), digest(payload)))
    final = block_path(root, block_hash)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(header)) + header)
            f.write(payload)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not fill up with half-written files
        raise


def _read_header(f, compat: str) -> BlockHeader:
    if f.read(len(MAGIC)) != MAGIC:
        raise CorruptBlockFile("not a tandem KV block file")
    raw = f.read(_LEN.size)
    if len(raw) != _LEN.size or (n := _LEN.unpack(raw)[0]) > _MAX_HEADER:
        raise CorruptBlockFile("truncated header")
    try:
        header = msgspec.msgpack.decode(f.read(n), type=BlockHeader)
    except msgspec.DecodeError as e:
        raise CorruptBlockFile(f"unreadable header ({e})") from None
    if header.compat != compat:
        raise CorruptBlockFile(f"written by another model or layout (compat {header.compat[:12]})")
    return header


def read_block(path: Path, compat: str, block_hash: bytes, num_bytes: int) -> bytes:
    """The payload of a file that holds exactly this block for this engine, else CorruptBlockFile."""
    with open(path, "rb") as f:
        header = _read_header(f, compat)
        payload = f.read(num_bytes + 1)
    if header.block_hash != block_hash or header.num_bytes != num_bytes or len(payload) != num_bytes:
        raise CorruptBlockFile("size or block hash differs from its name")
    if digest(payload) != header.digest:
        raise CorruptBlockFile("checksum mismatch")
    return payload


@dataclass
class FoundBlock:
    block_hash: bytes
    token_ids: list[int]
    mtime: float


def scan(root: Path, compat: str, num_bytes: int) -> tuple[list[FoundBlock], int]:
    """Blocks of this engine's layout under ``root``, oldest first, and how many files were skipped
    (their payloads are checked when read, not here: start-up reads headers only)."""
    found: list[FoundBlock] = []
    skipped = 0
    for path in root.glob(f"*{SUFFIX}"):
        try:
            with open(path, "rb") as f:
                header = _read_header(f, compat)
            if header.num_bytes != num_bytes or path.name != block_path(root, header.block_hash).name:
                raise CorruptBlockFile("size or block hash differs from its name")
            found.append(FoundBlock(header.block_hash, header.token_ids, path.stat().st_mtime))
        except (OSError, CorruptBlockFile) as e:
            skipped += 1
            logger.warning("KV disk tier: skipping %s: %s", path, e)
    for tmp in root.glob("*.tmp*"):  # a crashed writer's; a live engine's own are younger
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
    found.sort(key=lambda b: b.mtime)
    return found, skipped
