"""Which block hashes a tier holds and where: an LRU index with pins, kept on the core thread.

NOTE (invariants): an entry is ``ready`` only once the bytes it names are fully written (its store
job ended); only ready entries are matched. Pending and pinned entries are never evicted, so a slot
or file that a queued job will read or write keeps its meaning until that job's result is applied.
The jobs themselves run in one FIFO worker thread (``worker.py``), so a job sees every write that a
job queued before it made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TierEntry:
    location: int  # host tier: the slot; disk tier: a serial number that names the file
    token_ids: tuple[int, ...]  # checked on a hit, like the device pool's (a hash collision is a miss)
    ready: bool = False
    pins: int = 0  # queued loads that read it


class TierIndex:
    """hash -> TierEntry for at most ``capacity`` blocks, least recently used first."""

    def __init__(self, capacity: int, slots: bool) -> None:
        """``slots``: locations are reusable row numbers (host tier); else fresh serial numbers
        (disk tier, whose files are named by hash)."""
        self.capacity = capacity
        self.slots = slots
        self.entries: OrderedDict[bytes, TierEntry] = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1)) if slots else []
        self._next_name = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.entries

    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> TierEntry | None:
        """A ready entry holding exactly these tokens (refreshed as most recently used), else None."""
        entry = self.entries.get(block_hash)
        if entry is None or not entry.ready or entry.token_ids != tuple(token_ids):
            return None
        self.entries.move_to_end(block_hash)
        return entry

    def add(self, block_hash: bytes, token_ids: Sequence[int]) -> tuple[TierEntry | None, list[tuple[bytes, TierEntry]]]:
        """A new pending entry, evicting least recently used ready, unpinned entries for room.
        Returns (entry or None when every entry is busy, evicted (hash, entry) pairs)."""
        assert block_hash not in self.entries, "a block is never stored twice in one tier"
        evicted: list[tuple[bytes, TierEntry]] = []
        while len(self.entries) >= self.capacity:
            victim = next((h for h, e in self.entries.items() if e.ready and not e.pins), None)
            if victim is None:
                return None, evicted
            evicted.append((victim, self.entries.pop(victim)))
            if self.slots:
                self._free.append(evicted[-1][1].location)
        if self.slots:
            location = self._free.pop()
        else:
            location, self._next_name = self._next_name, self._next_name + 1
        entry = self.entries[block_hash] = TierEntry(location, tuple(token_ids))
        return entry, evicted

    def add_ready(self, block_hash: bytes, token_ids: Sequence[int]) -> TierEntry:
        """An entry found at start-up (disk): ready at once, newest last (callers add oldest first)."""
        entry, _ = self.add(block_hash, token_ids)
        assert entry is not None
        entry.ready = True
        return entry

    def remove(self, block_hash: bytes) -> TierEntry | None:
        """Forget an entry (a failed store or a corrupt file), freeing its slot."""
        entry = self.entries.pop(block_hash, None)
        if entry is not None and self.slots:
            self._free.append(entry.location)
        return entry

    @property
    def num_ready(self) -> int:
        return sum(e.ready for e in self.entries.values())

    def check_idle(self) -> None:
        """No job queued: nothing pending, nothing pinned."""
        for h, e in self.entries.items():
            assert e.ready and e.pins == 0, (h.hex()[:12], e)
