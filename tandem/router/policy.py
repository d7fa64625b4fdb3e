"""Routing policy: which worker gets a request. A pipeline of filters -> weighted scorers -> picker.

Pipeline, run by ``Policy.pick(req, workers)``:

1. Filters, in order, each ``(req, workers) -> workers``: ``healthy``, ``model_served``,
   ``not_saturated``, ``role``. When no worker survives, ``pick`` returns None (the caller
   answers 503). ``not_saturated`` never empties the list: if every worker is saturated it keeps
   them all, since queueing on a busy worker beats refusing.
2. Scorers, each ``(req, candidates) -> {url: score}`` with every score in [0, 1], 1 = best:
   ``prefix_cache`` (share of the request's full blocks the worker already holds, weighted by
   tier, by a ``PrefixMatcher``), ``prefill_cost`` (1 - (pending prefill tokens + the request's
   uncached tokens) / the max of that), ``queue_depth`` (1 - waiting / max waiting), ``kv_cache_utilization``
   (1 - kv_usage), ``running_requests`` (1 - load / max load), ``session_affinity`` (1 on the
   worker that last served the request's session). Total score of a worker =
   sum(weight_i * score_i) / sum(weight_i), so totals lie in [0, 1] too.
3. Picker, ``(candidates, totals) -> worker``: ``max_score`` (ties uniformly at random),
   ``weighted_random`` (probability proportional to total), ``round_robin`` (ignores scores).
4. Hot-spot guard (optional; on in ``cache-aware``): may move the pick off an overloaded
   prefix holder, see ``HotspotGuard``.

Cached blocks, for ``prefix_cache``, ``prefill_cost`` and the hot-spot guard, are the matcher's
``match_weighted``: the request's leading blocks the worker holds in any tier (the prefix ends at
the first block held in none), each counted with the weight of the best tier holding it: 1.0 on
the device, less in an offload tier (``tandem.router.index.DEFAULT_TIER_WEIGHTS``: CPU 0.8, DISK
0.5; router.yaml ``tier_weights`` overrides them). A prefix on a worker's device therefore beats
the same prefix in its host memory, which beats nothing. Uncached tokens = prompt tokens -
weighted blocks * block size.

State hooks. ``pick`` records its choice by calling ``observe(req, worker)`` (session affinity,
per-prefix in-flight counts) unless called with ``record=False``; the caller must then call
``release(req, worker)`` exactly once when that request ends (finished, failed or aborted).
Call ``observe`` yourself only for requests routed without ``pick`` (or with ``record=False``).

Built-in policies (``build_policy(name, matcher)``): ``round-robin``, ``least-load``,
``cache-aware`` (default). A YAML/dict config builds a custom one, e.g.::

    filters: [healthy, model_served, {not_saturated: {kv_threshold: 0.95}}]
    scorers: {prefix_cache: 2, running_requests: 1, queue_depth: 1}
    picker: max_score
    hotspot_margin: 4        # present and not null -> hot-spot guard on
    tier_weights: {CPU: 0.8, DISK: 0.5}   # read by the router for its exact index (not the policy)
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from tandem.router.types import RouteRequest, WorkerState

Scores = dict[str, float]

DEFAULT_POLICY = "cache-aware"
DEFAULT_HOTSPOT_MARGIN = 4.0


@runtime_checkable
class PrefixMatcher(Protocol):
    """Anything that says how many leading blocks of a request each worker holds."""

    def match_blocks(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """url -> leading blocks held in any tier."""
        ...

    def match_weighted(self, block_hashes: Sequence[bytes]) -> dict[str, float]:
        """url -> the same leading blocks, each weighted by the best tier holding it (device 1)."""
        ...

    def num_blocks(self, worker: str) -> int:
        """Blocks the index believes ``worker`` holds (on its device, for an index with tiers)."""
        ...


class Filter(Protocol):
    name: str

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]: ...


class Scorer(Protocol):
    """Returns url -> score in [0, 1] for every candidate. May also define ``observe(req, url)``
    and ``release(req, url)``."""

    name: str

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores: ...


class Picker(Protocol):
    name: str

    def __call__(self, workers: list[WorkerState], scores: Scores) -> WorkerState: ...


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _by_url(workers: list[WorkerState]) -> list[WorkerState]:
    return sorted(workers, key=lambda w: w.url)


# ---------------------------------------------------------------------------------------- filters


class HealthyFilter:
    """Keep workers marked healthy."""

    name = "healthy"

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.healthy]


class NotSaturatedFilter:
    """Drop workers with load >= max_num_seqs + queue_allowance or kv_usage >= kv_threshold;
    if that would drop every worker, keep them all (queue somewhere rather than refuse)."""

    name = "not_saturated"

    def __init__(self, queue_allowance: float = 16, kv_threshold: float = 0.98) -> None:
        self.queue_allowance = float(queue_allowance)
        self.kv_threshold = float(kv_threshold)

    def saturated(self, w: WorkerState) -> bool:
        return w.load >= w.max_num_seqs + self.queue_allowance or w.kv_usage >= self.kv_threshold

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        kept = [w for w in workers if not self.saturated(w)]
        return kept if kept else list(workers)


class ModelServedFilter:
    """Keep workers serving the requested model; an empty ``models`` set means unknown -> keep.
    A request naming no model (``model`` empty) may go to any worker, as a worker serves it."""

    name = "model_served"

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        if not req.model:
            return list(workers)
        return [w for w in workers if not w.models or req.model in w.models]


class RoleFilter:
    """Keep workers whose role is ``role`` or "both"."""

    name = "role"

    def __init__(self, role: str) -> None:
        if role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, not {role!r}")
        self.role = role

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.role in (self.role, "both")]


# ---------------------------------------------------------------------------------------- scorers


class PrefixCacheScorer:
    """Weighted matched leading blocks (``match_weighted``) / request blocks; 0 when the request
    has no full block."""

    name = "prefix_cache"

    def __init__(self, matcher: PrefixMatcher) -> None:
        self.matcher = matcher

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        total = len(req.block_hashes)
        if total == 0:
            return {w.url: 0.0 for w in workers}
        matched = self.matcher.match_weighted(req.block_hashes)
        return {w.url: _clamp01(matched.get(w.url, 0.0) / total) for w in workers}


class QueueDepthScorer:
    """1 - waiting / max waiting over the candidates; all 1 when nobody waits."""

    name = "queue_depth"

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        top = max((w.num_waiting for w in workers), default=0.0)
        if top <= 0:
            return {w.url: 1.0 for w in workers}
        return {w.url: _clamp01(1.0 - w.num_waiting / top) for w in workers}


class KVCacheUtilizationScorer:
    """1 - kv_usage."""

    name = "kv_cache_utilization"

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        return {w.url: _clamp01(1.0 - w.kv_usage) for w in workers}


class RunningRequestsScorer:
    """1 - load / max load over the candidates; all 1 when every candidate is idle."""

    name = "running_requests"

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        top = max((w.load for w in workers), default=0.0)
        if top <= 0:
            return {w.url: 1.0 for w in workers}
        return {w.url: _clamp01(1.0 - w.load / top) for w in workers}


class PrefillCostScorer:
    """Prefill work ahead of the request's first token on each worker: the worker's pending
    prefill tokens (router-counted) plus this request's tokens it does not cache (prompt tokens -
    the matcher's weighted blocks * block size: an offloaded block costs its share of a prefill).
    Score = 1 - cost / max cost over the candidates; all 1 when every cost is 0. Unlike request
    counts, it tells a worker busy with a long uncached prompt from one serving cache hits."""

    name = "prefill_cost"

    def __init__(self, matcher: PrefixMatcher, block_size: int = 16) -> None:
        self.matcher, self.block_size = matcher, block_size

    def costs(self, req: RouteRequest, workers: list[WorkerState]) -> dict[str, float]:
        matched = self.matcher.match_weighted(req.block_hashes) if req.block_hashes else {}
        n = len(req.token_ids)
        return {w.url: w.pending_prefill_tokens + max(0.0, n - matched.get(w.url, 0.0) * self.block_size)
                for w in workers}

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        costs = self.costs(req, workers)
        top = max(costs.values(), default=0.0)
        if top <= 0:
            return {url: 1.0 for url in costs}
        return {url: _clamp01(1.0 - c / top) for url, c in costs.items()}


class SessionAffinityScorer:
    """1 for the worker that last served the request's session_id, else 0. Remembers at most
    ``capacity`` sessions (least recently routed forgotten first)."""

    name = "session_affinity"

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("session_affinity capacity must be >= 1")
        self.capacity = capacity
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def __call__(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        last = self.sessions.get(req.session_id) if req.session_id is not None else None
        return {w.url: 1.0 if w.url == last else 0.0 for w in workers}

    def observe(self, req: RouteRequest, chosen_url: str) -> None:
        if req.session_id is None:
            return
        self.sessions[req.session_id] = chosen_url
        self.sessions.move_to_end(req.session_id)
        while len(self.sessions) > self.capacity:
            self.sessions.popitem(last=False)


# ---------------------------------------------------------------------------------------- pickers


class MaxScorePicker:
    """Highest total; ties (within 1e-9) broken uniformly at random."""

    name = "max_score"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, workers: list[WorkerState], scores: Scores) -> WorkerState:
        best = max(scores[w.url] for w in workers)
        tied = [w for w in _by_url(workers) if math.isclose(scores[w.url], best, abs_tol=1e-9)]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)


class WeightedRandomPicker:
    """Probability proportional to total score; uniform when every total is 0."""

    name = "weighted_random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, workers: list[WorkerState], scores: Scores) -> WorkerState:
        ordered = _by_url(workers)
        weights = [max(0.0, scores[w.url]) for w in ordered]
        if sum(weights) <= 0:
            return self.rng.choice(ordered)
        return self.rng.choices(ordered, weights=weights, k=1)[0]


class RoundRobinPicker:
    """Ignores scores: the candidate whose URL follows the last pick's, in URL order, wrapping."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.last_url: str | None = None

    def __call__(self, workers: list[WorkerState], scores: Scores) -> WorkerState:
        ordered = _by_url(workers)
        after = [w for w in ordered if self.last_url is not None and w.url > self.last_url]
        chosen = after[0] if after else ordered[0]
        self.last_url = chosen.url
        return chosen


# -------------------------------------------------------------------------------- hot-spot guard


class HotspotGuard:
    """Keeps a popular prefix from piling onto the one worker that caches it.

    Applies when the picked worker ("hot") holds the best prefix match among the candidates
    (weighted blocks > 0, by the matcher's ``match_weighted``) and hot.load > min_load + margin, where min_load is the least
    load among the candidates. The request then goes, with probability

        p = clamp(prefix_inflight_on_hot / max(1, hot.load), 0, 1)
            * clamp((hot.load - min_load - margin) / max(1, hot.load), 0, 1)

    to the least-loaded other candidate (ties broken by the rng). prefix_inflight_on_hot counts
    requests of this prefix (key: the request's first block hash) picked for hot and not yet
    released, kept by ``observe``/``release``. The first factor diverts in proportion to how much
    of hot's load is this prefix; the second grows with the excess load, so diversion stops once
    loads are within the margin. The diverted worker then builds the prefix too, and both score
    well on later requests. p is 0 (and no rng draw happens) when loads are within the margin.
    """

    def __init__(
        self, matcher: PrefixMatcher, margin: float = DEFAULT_HOTSPOT_MARGIN, rng: random.Random | None = None
    ) -> None:
        if margin < 0:
            raise ValueError("hotspot_margin must be >= 0")
        self.matcher = matcher
        self.margin = float(margin)
        self.rng = rng or random.Random()
        self.inflight: dict[tuple[bytes, str], int] = {}
        self.diversions = 0

    def divert_probability(self, req: RouteRequest, hot: WorkerState, workers: list[WorkerState]) -> float:
        """p for sending ``req`` elsewhere than ``hot``; 0 when the rule does not apply."""
        if not req.block_hashes or len(workers) < 2:
            return 0.0
        matched = self.matcher.match_weighted(req.block_hashes)
        best = max(matched.get(w.url, 0.0) for w in workers)
        if best <= 0 or matched.get(hot.url, 0.0) < best:
            return 0.0
        min_load = min(w.load for w in workers)
        if hot.load <= min_load + self.margin:
            return 0.0
        share = self.inflight.get((req.block_hashes[0], hot.url), 0) / max(1.0, hot.load)
        excess = (hot.load - min_load - self.margin) / max(1.0, hot.load)
        return _clamp01(share) * _clamp01(excess)

    def apply(self, req: RouteRequest, picked: WorkerState, workers: list[WorkerState]) -> WorkerState:
        """``picked``, or the least-loaded other candidate with probability p."""
        p = self.divert_probability(req, picked, workers)
        if p <= 0 or self.rng.random() >= p:
            return picked
        others = [w for w in _by_url(workers) if w.url != picked.url]
        low = min(w.load for w in others)
        self.diversions += 1
        return self.rng.choice([w for w in others if w.load == low])

    def observe(self, req: RouteRequest, chosen_url: str) -> None:
        if req.block_hashes:
            key = (req.block_hashes[0], chosen_url)
            self.inflight[key] = self.inflight.get(key, 0) + 1

    def release(self, req: RouteRequest, url: str) -> None:
        if not req.block_hashes:
            return
        key = (req.block_hashes[0], url)
        left = self.inflight.get(key, 0) - 1
        if left > 0:
            self.inflight[key] = left
        else:
            self.inflight.pop(key, None)


# ---------------------------------------------------------------------------------------- policy


class Policy:
    """filters -> weighted scorers -> picker (-> hot-spot guard)."""

    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
        hotspot_guard: HotspotGuard | None = None,
        name: str = "custom",
    ) -> None:
        if any(wt < 0 for _, wt in scorers):
            raise ValueError("scorer weights must be >= 0")
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self.hotspot_guard = hotspot_guard
        self.name = name

    def candidates(self, req: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        """Workers left after every filter."""
        kept = list(workers)
        for f in self.filters:
            kept = f(req, kept)
        return kept

    def breakdown(self, req: RouteRequest, workers: list[WorkerState]) -> dict[str, Scores]:
        """Scorer name -> url -> score, for the given (already filtered) workers."""
        return {s.name: s(req, workers) for s, _ in self.scorers}

    def scores(self, req: RouteRequest, workers: list[WorkerState]) -> Scores:
        """url -> sum(weight_i * score_i) / sum(weights); all 0 without weighted scorers."""
        total_weight = sum(wt for _, wt in self.scorers)
        totals = {w.url: 0.0 for w in workers}
        if total_weight <= 0:
            return totals
        for scorer, wt in self.scorers:
            for url, s in scorer(req, workers).items():
                if url in totals:
                    totals[url] += wt * s
        return {url: t / total_weight for url, t in totals.items()}

    def pick(self, req: RouteRequest, workers: Sequence[WorkerState], *, record: bool = True) -> WorkerState | None:
        """The worker for ``req``, or None when no worker passes the filters. With ``record``,
        calls ``observe``; pair it with one ``release`` when the request ends."""
        cands = self.candidates(req, workers)
        if not cands:
            return None
        chosen = self.picker(cands, self.scores(req, cands))
        if self.hotspot_guard is not None:
            chosen = self.hotspot_guard.apply(req, chosen, cands)
        if record:
            self.observe(req, chosen)
        return chosen

    def _hooked(self) -> list[Any]:
        parts: list[Any] = [s for s, _ in self.scorers]
        return parts + ([self.hotspot_guard] if self.hotspot_guard is not None else [])

    def observe(self, req: RouteRequest, worker: WorkerState) -> None:
        """``req`` was sent to ``worker``: forwarded to every part with an ``observe`` hook."""
        for part in self._hooked():
            if hasattr(part, "observe"):
                part.observe(req, worker.url)

    def release(self, req: RouteRequest, worker: WorkerState) -> None:
        """``req`` on ``worker`` ended: forwarded to every part with a ``release`` hook."""
        for part in self._hooked():
            if hasattr(part, "release"):
                part.release(req, worker.url)


# ------------------------------------------------------------------------------------- building

FILTERS: dict[str, Callable[..., Filter]] = {
    "healthy": HealthyFilter,
    "not_saturated": NotSaturatedFilter,
    "model_served": ModelServedFilter,
    "role": RoleFilter,
}
PICKERS: dict[str, Callable[..., Picker]] = {
    "max_score": MaxScorePicker,
    "weighted_random": WeightedRandomPicker,
    "round_robin": RoundRobinPicker,
}
SCORERS: dict[str, Callable[..., Scorer]] = {
    "prefix_cache": PrefixCacheScorer,
    "queue_depth": QueueDepthScorer,
    "kv_cache_utilization": KVCacheUtilizationScorer,
    "running_requests": RunningRequestsScorer,
    "session_affinity": SessionAffinityScorer,
    "prefill_cost": PrefillCostScorer,
}
BUILTIN_POLICIES: dict[str, dict[str, Any]] = {
    "round-robin": {"filters": ["healthy", "model_served"], "scorers": {}, "picker": "round_robin"},
    "least-load": {
        "filters": ["healthy", "model_served", "not_saturated"],
        "scorers": {"running_requests": 1, "queue_depth": 1},
        "picker": "max_score",
    },
    "cache-aware": {
        "filters": ["healthy", "model_served", "not_saturated"],
        "scorers": {"prefix_cache": 2, "prefill_cost": 1, "running_requests": 1, "kv_cache_utilization": 0.5,
                    "session_affinity": 1},
        "picker": "max_score",
        "hotspot_margin": DEFAULT_HOTSPOT_MARGIN,
    },
}
CONFIG_KEYS = ("filters", "scorers", "picker", "hotspot_margin", "name", "tier_weights")


def _lookup(kind: str, table: dict[str, Any], name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def _entry(spec: Any, kind: str) -> tuple[str, Any]:
    """A config entry ``name`` or ``{name: params}`` -> (name, params)."""
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, dict) and len(spec) == 1:
        return next(iter(spec.items()))
    raise ValueError(f"a {kind} must be a name or a one-key mapping, not {spec!r}")


def _construct(factory: Callable[..., Any], params: Any, *args: Any) -> Any:
    """params: None -> no kwargs, mapping -> kwargs, scalar -> one positional argument."""
    if params is None:
        return factory(*args)
    if isinstance(params, dict):
        return factory(*args, **params)
    return factory(*args, params)


def _build_filter(spec: Any) -> Filter:
    name, params = _entry(spec, "filter")
    return _construct(_lookup("filter", FILTERS, name), params)


def _build_scorer(name: str, spec: Any, matcher: PrefixMatcher) -> tuple[Scorer, float]:
    """spec: a weight, or a mapping with optional ``weight`` (default 1) and scorer params."""
    factory = _lookup("scorer", SCORERS, name)
    params = dict(spec) if isinstance(spec, dict) else {"weight": 1.0 if spec is None else spec}
    weight = float(params.pop("weight", 1.0))
    args = (matcher,) if factory in (PrefixCacheScorer, PrefillCostScorer) else ()
    return factory(*args, **params), weight


def _build_picker(spec: Any, rng: random.Random) -> Picker:
    name, params = _entry(spec, "picker")
    return _lookup("picker", PICKERS, name)(rng=rng, **(params or {}))


def policy_from_config(config: dict[str, Any], matcher: PrefixMatcher, rng: random.Random | None = None) -> Policy:
    """A Policy from a dict as loaded from YAML (keys: filters, scorers, picker, hotspot_margin,
    name; tier_weights is the router's, see ``tier_weights_of``). Missing filters -> healthy,
    model_served, not_saturated; missing picker -> max_score; hotspot_margin absent or null -> no
    hot-spot guard."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown policy config keys {sorted(unknown)}; valid: {', '.join(CONFIG_KEYS)}")
    rng = rng or random.Random()
    filter_specs = config.get("filters", ["healthy", "model_served", "not_saturated"])
    scorer_specs = config.get("scorers") or {}
    if not isinstance(scorer_specs, dict):
        raise ValueError("scorers must be a mapping name -> weight (or name -> {weight, params})")
    margin = config.get("hotspot_margin")
    return Policy(
        filters=[_build_filter(s) for s in filter_specs or []],
        scorers=[_build_scorer(n, s, matcher) for n, s in scorer_specs.items()],
        picker=_build_picker(config.get("picker", "max_score"), rng),
        hotspot_guard=None if margin is None else HotspotGuard(matcher, float(margin), rng),
        name=str(config.get("name", "custom")),
    )


def build_policy(
    name_or_config: str | dict[str, Any] | None, matcher: PrefixMatcher, rng: random.Random | None = None
) -> Policy:
    """A built-in policy by name (None -> cache-aware) or a custom one from a config dict."""
    if name_or_config is None:
        name_or_config = DEFAULT_POLICY
    if isinstance(name_or_config, str):
        config = _lookup("policy", BUILTIN_POLICIES, name_or_config)
        return policy_from_config({**config, "name": name_or_config}, matcher, rng)
    if isinstance(name_or_config, dict):
        return policy_from_config(name_or_config, matcher, rng)
    raise ValueError(f"a policy is a name or a config mapping, not {type(name_or_config).__name__}")


def read_policy_file(path: str | Path) -> str | dict[str, Any]:
    """A YAML file's config mapping or built-in policy name."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, (str, dict)):
        raise ValueError(f"{path}: expected a policy mapping or name, got {type(data).__name__}")
    return data


def load_policy_file(path: str | Path, matcher: PrefixMatcher, rng: random.Random | None = None) -> Policy:
    """A policy from a YAML file holding a config mapping or a built-in name."""
    return build_policy(read_policy_file(path), matcher, rng)


def tier_weights_of(config: str | dict[str, Any] | None) -> dict[str, float] | None:
    """A config's ``tier_weights`` (offload medium -> weight in [0, 1] of a block held only there,
    for the router's exact prefix index), or None (the index's defaults) when it has none."""
    weights = config.get("tier_weights") if isinstance(config, dict) else None
    if weights is None:
        return None
    if not isinstance(weights, dict) or not all(
            isinstance(m, str) and isinstance(w, (int, float)) and 0 <= w <= 1 for m, w in weights.items()):
        raise ValueError(f"tier_weights must map medium names to weights in [0, 1], not {weights!r}")
    return {m: float(w) for m, w in weights.items()}
