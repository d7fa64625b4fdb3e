"""Plain data shared by the router's parts: what it knows of each worker and of each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerState:
    """One worker as the router sees it. Load fields come from the worker's /metrics (vLLM
    names) polled every few hundred ms; in_flight is counted by the router itself and is exact."""

    url: str  # http://host:port, also the worker's identity in every index
    healthy: bool = True
    role: str = "both"  # "prefill" | "decode" | "both"
    models: set[str] = field(default_factory=set)
    num_running: float = 0.0  # vllm:num_requests_running
    num_waiting: float = 0.0  # vllm:num_requests_waiting
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, in [0, 1]
    in_flight: int = 0  # requests the router has sent and not seen finish
    pending_prefill_tokens: int = 0  # uncached prompt tokens of requests sent and not yet answered
    max_num_seqs: int = 256  # capacity hint for saturation and load normalisation
    kv_transfer_bytes: float = 0.0  # decode workers: KV bytes loaded from prefill workers so far
    kv_transfer_seconds: float = 0.0  # ... and the seconds those loads took
    # prefill workers: the fields of the last ticket it issued (endpoint, compat, block size, lease,
    # KV bytes per token), from which the router signs pending tickets for concurrent legs
    kv_ticket: dict | None = None
    # fingerprint of the worker's KV transfer secret (tandem:kv_transfer_key_info); None: not published
    kv_key_id: str | None = None

    @property
    def prefills(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def decodes(self) -> bool:
        return self.role in ("decode", "both")
    consecutive_failures: int = 0

    @property
    def load(self) -> float:
        """Requests on the worker: the larger of what it reports and what the router sent."""
        return max(self.num_running + self.num_waiting, float(self.in_flight))


@dataclass
class RouteRequest:
    """What the policy sees of a request."""

    model: str
    token_ids: list[int]  # the prompt as the worker will tokenize it
    block_hashes: list[bytes]  # chained hashes of its full blocks (tandem.router.index.prompt_block_hashes)
    session_id: str | None = None  # from the session-affinity header
