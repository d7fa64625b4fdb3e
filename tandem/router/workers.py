"""The worker pool: active health checks and load polling, plus passive failure accounting.

Invariant: a worker leaves the pool (healthy=False, its prefix-index entries dropped) within
POLL_INTERVAL_S + CHECK_TIMEOUT_S of becoming unreachable, or at once after
MAX_CONSECUTIVE_FAILURES failed requests; it comes back on its next successful check.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tandem.router.types import WorkerState

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
CHECK_TIMEOUT_S = 1.0
MAX_CONSECUTIVE_FAILURES = 2

_GAUGES = {"vllm:num_requests_running": "num_running", "vllm:num_requests_waiting": "num_waiting",
           "vllm:kv_cache_usage_perc": "kv_usage",
           # disaggregated decode workers: measured link speed for the P/D decider
           "tandem:kv_transfer_bytes_total": "kv_transfer_bytes", "tandem:kv_transfer_seconds_total": "kv_transfer_seconds"}
_KEY_ID = re.compile(r'^tandem:kv_transfer_key_info\{key_id="([0-9a-f]{16})"\}', re.M)
_LINE = re.compile(r"^((?:vllm|tandem):[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


@dataclass
class WorkerSpec:
    """`URL[,events=ENDPOINT][,replay=ENDPOINT][,role=prefill|decode|both]` from the command line."""

    url: str
    events: str | None = None
    replay: str | None = None
    role: str = "both"

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        url, *opts = text.split(",")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"worker {text!r}: expected http://host:port[,events=...][,replay=...][,role=...]")
        spec = cls(url.rstrip("/"))
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in ("events", "replay", "role") or not value:
                raise ValueError(f"worker {text!r}: unknown option {opt!r}")
            setattr(spec, key, value)
        if spec.role not in ("prefill", "decode", "both"):
            raise ValueError(f"worker {text!r}: role must be prefill, decode or both")
        return spec


def parse_load(metrics_text: str) -> dict[str, float]:
    """vLLM-named gauges summed over label sets -> WorkerState field values."""
    out: dict[str, float] = {}
    for name, value in _LINE.findall(metrics_text):
        if name in _GAUGES:
            out[_GAUGES[name]] = out.get(_GAUGES[name], 0.0) + float(value)
    return out


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], on_down: Callable[[str], None] = lambda url: None) -> None:
        self.specs = {s.url: s for s in specs}
        self.workers = {s.url: WorkerState(s.url, healthy=False, role=s.role) for s in specs}
        self.on_down = on_down
        self._http = httpx.AsyncClient(timeout=CHECK_TIMEOUT_S)
        self._task: asyncio.Task | None = None

    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.healthy]

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._http.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers.values()))

    async def check(self, w: WorkerState) -> None:
        try:
            health = await self._http.get(f"{w.url}/health")
            ok = health.status_code == 200
            if ok:
                metrics = await self._http.get(f"{w.url}/metrics")
                for field, value in parse_load(metrics.text).items():
                    setattr(w, field, value)
                key = _KEY_ID.search(metrics.text)
                w.kv_key_id = key.group(1) if key else None
                if not w.models:
                    models = await self._http.get(f"{w.url}/v1/models")
                    w.models = {m["id"] for m in models.json().get("data", [])}
        except (httpx.HTTPError, ValueError):
            ok = False
        self._set_health(w, ok)

    def _set_health(self, w: WorkerState, ok: bool) -> None:
        if ok and not w.healthy:
            logger.info("worker %s is up", w.url)
            w.consecutive_failures = 0
        if not ok and w.healthy:
            logger.warning("worker %s is down", w.url)
            w.kv_ticket = None  # a restarted worker may send KV from another endpoint: learn it again
            self.on_down(w.url)
        w.healthy = ok

    def report_failure(self, url: str) -> None:
        """Passive check: a request to this worker failed (connection or 5xx)."""
        w = self.workers[url]
        w.consecutive_failures += 1
        if w.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            self._set_health(w, False)

    def report_success(self, url: str) -> None:
        self.workers[url].consecutive_failures = 0
