"""N-gram (prompt lookup) proposals that stay cheap on long contexts.

``NgramIndex`` keeps, for each n in [min_n, max_n], a hash map from the n-gram ending at every
position to the latest such position, updated as tokens are appended: O(max_n - min_n + 1) work
per token, and a proposal is at most that many dictionary probes, whatever the context length
(vLLM's matcher scans the context per step, slow on long prompts, its issue #16883). The proposal
follows the most recent earlier occurrence of the longest suffix that occurred before.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # n -> n-gram -> end position (exclusive) of its latest occurrence before the last token's
        self._latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._pending: dict[int, tuple[tuple[int, ...], int]] = {}  # the suffix n-grams, indexed one token late

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            for n, (gram, end) in self._pending.items():  # the previous suffixes are now "earlier"
                self._latest[n][gram] = end
            self._pending.clear()
            self.tokens.append(int(t))
            size = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, size) + 1):
                self._pending[n] = (tuple(self.tokens[size - n:]), size)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        size = len(self.tokens)
        for n in range(min(self.max_n, size), self.min_n - 1, -1):
            end = self._latest[n].get(tuple(self.tokens[size - n:]))
            if end is not None:
                return self.tokens[end:end + k]
        return []


class NgramProposer:
    """One ``NgramIndex`` per request, built on its first proposal and extended with the tokens
    appended since (prompt and output alike)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, NgramIndex] = {}

    def propose(self, request_id: str, token_ids: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow ``token_ids`` (the request's tokens so far)."""
        index = self._indexes.get(request_id)
        if index is None or len(index.tokens) > len(token_ids):
            index = self._indexes[request_id] = NgramIndex(self.min_n, self.max_n)
        index.extend(token_ids[len(index.tokens):])
        return index.propose(k) if k > 0 else []

    def forget(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
