"""The offload tiers' bookkeeping (``TierIndex``) and the disk tier's file format, without an engine."""

from __future__ import annotations

import os

import pytest

from tandem.kv_offload import disk
from tandem.kv_offload.tiers import TierIndex


def _h(i: int) -> bytes:
    return bytes([i]) * 32


def _ready(tier: TierIndex, i: int) -> None:
    entry, _ = tier.add(_h(i), [i])
    assert entry is not None
    entry.ready = True


def test_only_ready_entries_with_the_same_tokens_match():
    tier = TierIndex(4, slots=True)
    entry, evicted = tier.add(_h(1), [1, 2])
    assert entry is not None and not evicted
    assert tier.lookup(_h(1), [1, 2]) is None, "pending: its bytes are not written yet"
    entry.ready = True
    assert tier.lookup(_h(1), [1, 2]) is entry
    assert tier.lookup(_h(1), [1, 3]) is None, "a hash collision is a miss"


def test_eviction_is_lru_and_spares_pending_and_pinned_entries():
    tier = TierIndex(3, slots=True)
    for i in range(3):
        _ready(tier, i)
    tier.lookup(_h(0), [0])  # 0 is now the most recently used
    tier.entries[_h(1)].pins = 1  # a queued load reads 1
    entry, evicted = tier.add(_h(3), [3])
    assert [h for h, _ in evicted] == [_h(2)]
    assert entry is not None and entry.location == evicted[0][1].location, "the freed slot is reused"
    entry, evicted = tier.add(_h(4), [4])  # 3 is pending, 1 pinned: 0 goes
    assert [h for h, _ in evicted] == [_h(0)]
    assert tier.add(_h(5), [5]) == (None, []), "every entry busy: nothing is stored"


def test_a_block_is_never_stored_twice_and_removal_frees_its_slot():
    tier = TierIndex(2, slots=True)
    _ready(tier, 1)
    with pytest.raises(AssertionError):
        tier.add(_h(1), [1])
    slot = tier.entries[_h(1)].location
    tier.remove(_h(1))
    entry, _ = tier.add(_h(2), [2])
    entry2, _ = tier.add(_h(3), [3])
    assert entry is not None and entry2 is not None and slot in {entry.location, entry2.location}


def test_block_files_round_trip_and_refuse_what_they_must(tmp_path):
    payload = bytes(range(256)) * 4
    disk.write_block(tmp_path, "c" * 32, _h(7), [1, 2, 3], memoryview(payload))
    path = disk.block_path(tmp_path, _h(7))
    assert disk.read_block(path, "c" * 32, _h(7), len(payload)) == payload
    with pytest.raises(disk.CorruptBlockFile, match="another model"):
        disk.read_block(path, "d" * 32, _h(7), len(payload))
    with pytest.raises(disk.CorruptBlockFile, match="size"):
        disk.read_block(path, "c" * 32, _h(7), len(payload) + 1)
    found, skipped = disk.scan(tmp_path, "c" * 32, len(payload))
    assert [(b.block_hash, b.token_ids) for b in found] == [(_h(7), [1, 2, 3])] and skipped == 0
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(disk.CorruptBlockFile, match="checksum"):
        disk.read_block(path, "c" * 32, _h(7), len(payload))
    (tmp_path / f"{'00' * 32}{disk.SUFFIX}").write_bytes(b"not a block")
    (tmp_path / "crashed.tmp123").write_bytes(b"x")
    os.utime(tmp_path / "crashed.tmp123", (0, 0))
    (tmp_path / "live.tmp456").write_bytes(b"x")  # another engine writing into the same directory now
    found, skipped = disk.scan(tmp_path, "c" * 32, len(payload))
    assert len(found) == 1 and skipped == 1
    assert not (tmp_path / "crashed.tmp123").exists(), "a crashed writer's temporary file is cleaned up"
    assert (tmp_path / "live.tmp456").exists(), "a live writer's is left alone"
