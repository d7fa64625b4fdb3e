"""Proposals of a draft model or an EAGLE head (methods ``draft_model``, ``eagle``), as the scheduler
sees them.

The drafter runs in the model runner after each target step (tandem/runner/drafter.py,
tandem/runner/eagle_drafter.py) and proposes
the drafts for the next one; the runner's output carries them here. Each proposal follows the
token sequence of one length, and is only handed out for exactly that sequence: when the scheduler
took fewer of the step's tokens (a stop) or the request was preempted, it is stale and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping


class DraftModelProposals:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, list[int]]] = {}  # request id -> (tokens it follows, drafts)

    def store(self, proposals: Mapping[str, tuple[int, list[int]]]) -> None:
        self._latest.update(proposals)

    def propose(self, request_id: str, token_ids: list[int], k: int) -> list[int]:
        """Up to k drafts proposed for ``token_ids`` (the request's tokens so far); [] if none was."""
        entry = self._latest.pop(request_id, None)
        if entry is None or entry[0] != len(token_ids):
            return []
        return entry[1][:k]

    def forget(self, request_id: str) -> None:
        self._latest.pop(request_id, None)
