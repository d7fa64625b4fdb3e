"""How many draft tokens each request verifies this step: from measured acceptance and step cost.

A step of ``n`` tokens is modelled as taking ``fixed + per_token * n`` seconds, fitted by least
squares over the latest steps (``StepCostModel``). A request whose drafts are accepted with
probability ``alpha`` per position (geometric: the j-th draft counts only if the j - 1 before it
did) gains ``alpha ** j`` expected tokens from its j-th draft, for ``per_token`` more seconds.
``SpeculationPlanner.plan`` adds drafts in order of that gain while each one raises the step's
expected tokens per second, i.e. while ``gain / per_token > tokens / time`` of the step so far.
When a step is dominated by its fixed cost (a small batch reading the weights once) drafts are
nearly free and most are taken; when per-token compute dominates (a large batch) the rate of the
step is already about ``1 / per_token`` and no draft with ``alpha < 1`` can raise it, so
speculation stops by itself: a loaded server is never made slower by it.

The model can be wrong (a chunk with drafts leaves the single-token decode kernel, a cost per
sequence it does not see), so above it sits a measured check: in each batch-size bucket, decode
steps with and without drafts are compared by their emitted tokens per second, pairing the two
steps around each switch of policy; the faster policy runs and the slower one is retried at
intervals from EXPLORE_EVERY to MAX_EXPLORE_EVERY steps (``speculate_now``).

Acceptance per request is counted with decay (recent behaviour counts most), starting from the
pooled acceptance of every request so far; a request passed over PROBE_INTERVAL times in a row
verifies one draft, so that its estimate can recover.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

# decay of a request's acceptance counts per verified step, and the weight of the pooled prior
ACCEPTANCE_DECAY = 0.8
PRIOR_TRIALS = 2.0
COST_WINDOW = 128  # steps the cost model fits over
MIN_COST_SAMPLES = 8
# a request passed over this many times in a row verifies one draft, so that an acceptance estimate
# that fell low can rise again when its text turns repetitive
PROBE_INTERVAL = 64
# decode steps: the policy (speculate or not) measured worse in a batch-size bucket is still run
# after EXPLORE_EVERY steps there, then at doubling intervals while it stays worse, so that a change
# in the workload is noticed
EXPLORE_EVERY = 16
MAX_EXPLORE_EVERY = 128
MIN_PAIRS = 3  # pairs of adjacent steps measured (alternating) before a verdict
RATE_EMA = 0.2


class SpecDecodeStats(msgspec.Struct):
    """vLLM's spec_decode counters: verified steps with drafts, draft tokens, accepted tokens, and
    accepted tokens per draft position (cumulative; sent to the API process with the engine stats)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = []

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < proposed:
            self.accepted_per_pos.extend([0] * (proposed - len(self.accepted_per_pos)))
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per verified step (accepted drafts + the one the target always gives)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class StepCostModel:
    """seconds ~ fixed + per_token * tokens over the last COST_WINDOW steps."""

    def __init__(self, window: int = COST_WINDOW) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._last: tuple[float, float] | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.samples.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token), both >= 0; None until the steps seen differ enough in size (then
        the last fit that could be made holds: a steady batch does not make the slope unknown)."""
        if len(self.samples) < MIN_COST_SAMPLES:
            return self._last
        m = len(self.samples)
        mean_n = sum(n for n, _ in self.samples) / m
        mean_t = sum(t for _, t in self.samples) / m
        var_n = sum((n - mean_n) ** 2 for n, _ in self.samples)
        if var_n < m * 0.25:  # every step about the same size: the slope is unknown
            return self._last
        per_token = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in self.samples) / var_n)
        self._last = (max(0.0, mean_t - per_token * mean_n), per_token)
        return self._last


@dataclass
class _Acceptance:
    accepted: float
    trials: float

    @property
    def rate(self) -> float:
        return self.accepted / self.trials if self.trials else 0.0


@dataclass
class _PolicyRates:
    """Speculating or not in one batch-size bucket, judged by adjacent decode steps: each time the
    policy switches, the two steps on either side of the switch give one sample of the ratio of
    their emitted tokens per second (adjacent, so the growth of the contexts cancels out). The
    policy judged slower is retried after ``interval`` steps, an interval that doubles (up to
    MAX_EXPLORE_EVERY) while the retries confirm the verdict and starts again when one reverses it."""

    log_ratio: float | None = None  # log(rate with drafts / rate without): mean of the first pairs, then EMA
    pairs: int = 0
    steps: int = 0
    since_retry: int = 0
    interval: int = EXPLORE_EVERY
    last: tuple[bool, float] | None = None  # the previous decode step: (speculated, rate)

    def choose(self) -> bool:
        speculate = self.peek()
        self.steps += 1
        if self.log_ratio is not None and self.pairs >= MIN_PAIRS:
            self.since_retry += 1
            if self.since_retry >= self.interval:
                self.since_retry = 0
        return speculate

    def peek(self) -> bool:
        """What the next ``choose`` returns, without choosing."""
        if self.log_ratio is None or self.pairs < MIN_PAIRS:
            return self.steps % 2 == 0  # alternate until a few pairs are measured (the first speculates)
        if self.since_retry + 1 >= self.interval:
            return self.log_ratio < 0  # a retry of the policy measured slower
        return self.log_ratio >= 0

    def observe(self, speculated: bool, rate: float) -> None:
        if self.last is not None and self.last[0] != speculated and rate > 0 and self.last[1] > 0:
            with_drafts, without = (rate, self.last[1]) if speculated else (self.last[1], rate)
            sample = math.log(with_drafts / without)
            before = self.log_ratio
            self.pairs += 1
            weight = 1 / self.pairs if self.pairs <= MIN_PAIRS else RATE_EMA
            self.log_ratio = sample if before is None else before + weight * (sample - before)
            if before is None or self.pairs <= MIN_PAIRS or (before >= 0) != (self.log_ratio >= 0):
                self.interval = EXPLORE_EVERY  # the verdict is new: check it again soon
            elif speculated == (before < 0):  # a retry of the slower policy confirmed the verdict
                self.interval = min(2 * self.interval, MAX_EXPLORE_EVERY)
        self.last = (speculated, rate)


class SpeculationPlanner:
    def __init__(self, num_speculative_tokens: int, adaptive: bool = True) -> None:
        self.max_drafts = num_speculative_tokens
        self.adaptive = adaptive
        self.cost = StepCostModel()
        self.stats = SpecDecodeStats()
        self._pooled = _Acceptance(1.0, PRIOR_TRIALS)  # starts at 0.5
        self._per_request: dict[str, _Acceptance] = {}
        self._passed_over: dict[str, int] = {}
        self._rates: dict[int, _PolicyRates] = {}  # batch-size bucket (log2) -> measured policies

    def speculate_now(self, batch_size: int) -> bool:
        """Whether this decode step proposes drafts at all: the policy measured faster at this batch
        size (the two alternate until measured; the slower one is still retried now and then).
        Always when not adaptive."""
        return not self.adaptive or self._rates.setdefault(batch_size.bit_length(), _PolicyRates()).choose()

    def speculation_measured_better(self, batch_size: int) -> bool:
        """For a step that also computes prompt chunks (not measured, nothing explored): speculate
        unless decode steps at this batch size measured it slower."""
        rates = self._rates.get(batch_size.bit_length())
        return not self.adaptive or rates is None or rates.log_ratio is None or rates.log_ratio >= 0

    def speculates_next(self, batch_size: int) -> bool:
        """Whether the next decode step at this batch size will verify drafts (a draft model proposes
        them one step ahead, and only when they will be used)."""
        rates = self._rates.get(batch_size.bit_length())
        return not self.adaptive or rates is None or rates.peek()

    def observe_step(self, batch_size: int, speculated: bool, emitted: int, seconds: float) -> None:
        """A decode step (no prompt chunk) ran: ``emitted`` tokens in ``seconds``."""
        if self.adaptive and batch_size > 0 and seconds > 0:
            self._rates.setdefault(batch_size.bit_length(), _PolicyRates()).observe(speculated, emitted / seconds)

    def acceptance(self, request_id: str) -> float:
        own = self._per_request.get(request_id)
        return (own or self._pooled).rate

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """One verified step: ``accepted`` of ``proposed`` drafts (each position a trial until the
        first rejection)."""
        self.stats.record(proposed, accepted)
        trials = accepted + (accepted < proposed)
        own = self._per_request.get(request_id)
        if own is None:
            own = self._per_request[request_id] = _Acceptance(self._pooled.rate * PRIOR_TRIALS, PRIOR_TRIALS)
        own.accepted = own.accepted * ACCEPTANCE_DECAY + accepted
        own.trials = own.trials * ACCEPTANCE_DECAY + trials
        self._pooled.accepted += accepted
        self._pooled.trials += trials

    def forget(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)
        self._passed_over.pop(request_id, None)

    def plan(self, available: dict[str, int], base_tokens: int, base_emitted: int) -> dict[str, int]:
        """Draft tokens per request (absent: none). available: request id -> drafts it could verify
        (its proposal's length); base_tokens / base_emitted: the step's tokens and sampled tokens
        without drafts."""
        fit = self.cost.fit() if self.adaptive else None
        if fit is None:
            return dict(available)  # nothing measured yet (or not adaptive): verify every proposal
        fixed, per_token = fit
        time = fixed + per_token * max(1, base_tokens)
        emitted = float(max(1, base_emitted))
        alphas = {rid: self.acceptance(rid) for rid in available}
        heap = [(-alphas[rid], rid, 1) for rid, n in available.items() if n > 0]
        heapq.heapify(heap)
        chosen: dict[str, int] = {}
        while heap:
            neg_gain, rid, j = heapq.heappop(heap)
            gain = -neg_gain
            if gain * time <= emitted * per_token:
                break  # gains only fall from here: no further draft raises the step's rate
            chosen[rid] = j
            time += per_token
            emitted += gain
            if j < available[rid]:
                heapq.heappush(heap, (-gain * alphas[rid], rid, j + 1))
        for rid in available:
            if rid in chosen:
                self._passed_over.pop(rid, None)
            elif (passed := self._passed_over.get(rid, 0) + 1) >= PROBE_INTERVAL:
                chosen[rid] = 1
                self._passed_over.pop(rid, None)
            else:
                self._passed_over[rid] = passed
        return chosen


def truncate_plan(plan: dict[str, int], proposals: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The draft tokens each planned request verifies."""
    return {rid: list(proposals[rid][:k]) for rid, k in plan.items() if k > 0}
