"""The P/D decider: per request, prefill on the chosen decode worker, or on a prefill worker with
the KV shipped over (disaggregation), whichever costs less.

Costs, in seconds, with ``c`` = prefill seconds per token (learned from prefill legs) and
``uncached_x`` = prompt tokens - worker x's cached leading blocks * block size, where cached means
held in any tier (``PrefixMatcher.match_blocks``): a prefix in a decode worker's host memory or on
its disk counts as cache in full, since loading it is cheap next to computing it or shipping it:
- local:  the request waits (pending_d + uncached_d) * c, and every stream running on the decode
          worker stalls for uncached_d * c while the prompt is computed there, weighted by
          ``interference_weight``: local = (pending_d + uncached_d) * c + w * running_d * uncached_d * c
- remote: (pending_p + uncached_p) * c + uncached_d * kv_bytes_per_token / link_bytes_per_s + hop_s
          (only the blocks the decode worker lacks travel; hop_s is the extra HTTP round trip)
The prefill worker minimising ``remote`` is paired with the decode worker the policy chose; the
request splits when that remote cost is below the local one. An idle decode worker therefore
keeps short and long prompts alike (splitting only adds transfer and hop), a busy one sheds long
prompts first. ``threshold`` replaces all this with llm-d's fixed rule (split iff uncached_d >= N).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tandem.router.types import WorkerState

_EWMA = 0.2
_MIN_TOKENS_TO_LEARN = 64  # shorter prefill legs are all overhead: they teach nothing about c


@dataclass
class PDCosts:
    prefill_s_per_token: float = 3e-4
    link_bytes_per_s: float = 1e9  # until a decode worker reports measured transfers
    hop_s: float = 0.01
    interference_weight: float = 1.0
    kv_bytes_per_token: int = 0


@dataclass
class PDPlan:
    split: bool
    prefill: WorkerState | None
    local_s: float
    remote_s: float


def kv_bytes_per_token_from_config(model_dir: str | None, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token (MLA: its one latent row per layer); the workers'
    tickets correct it on the first split."""
    if not model_dir or not (Path(model_dir) / "config.json").exists():
        return 0
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("kv_lora_rank"):  # DeepSeek-V2/V3's latent cache (tandem/model/mla.py)
        return cfg.get("num_hidden_layers", 0) * (cfg["kv_lora_rank"] + cfg.get("qk_rope_head_dim", 0)) * dtype_bytes
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    return 2 * cfg.get("num_hidden_layers", 0) * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes


class PDDecider:
    def __init__(self, costs: PDCosts, block_size: int, threshold: int | None = None) -> None:
        self.costs, self.block_size, self.threshold = costs, block_size, threshold

    def plan(self, num_tokens: int, decode: WorkerState, prefills: list[WorkerState],
             matched: dict[str, int], counted_on_decode: int = 0) -> PDPlan:
        """matched: url -> leading blocks held in any tier. counted_on_decode: this request's
        tokens, already in the decode worker's pending count (the policy's pick accounted them);
        they are not a queue ahead of it."""
        c = self.costs
        uncached_d = max(0, num_tokens - matched.get(decode.url, 0) * self.block_size)
        pending_d = max(0, decode.pending_prefill_tokens - counted_on_decode)
        local = (pending_d + uncached_d) * c.prefill_s_per_token \
            + c.interference_weight * decode.num_running * uncached_d * c.prefill_s_per_token
        transfer = uncached_d * c.kv_bytes_per_token / self.link_bytes_per_s(decode) + c.hop_s
        best, remote = None, float("inf")
        for p in prefills:
            if p.url == decode.url:
                continue
            uncached_p = max(0, num_tokens - matched.get(p.url, 0) * self.block_size)
            cost = (p.pending_prefill_tokens + uncached_p) * c.prefill_s_per_token + transfer
            if cost < remote:
                best, remote = p, cost
        if best is None or uncached_d <= 1:
            return PDPlan(False, None, local, remote)
        split = uncached_d >= self.threshold if self.threshold is not None else remote < local
        return PDPlan(split, best if split else None, local, remote)

    def link_bytes_per_s(self, decode: WorkerState) -> float:
        if decode.kv_transfer_seconds > 0 and decode.kv_transfer_bytes > 0:
            return decode.kv_transfer_bytes / decode.kv_transfer_seconds
        return self.costs.link_bytes_per_s

    def observe_prefill(self, tokens: int, seconds: float, ticket: dict | None) -> None:
        """Learn prefill seconds per token from a prefill leg's wall time (queueing included)."""
        c = self.costs
        if ticket and isinstance(ticket.get("kv_bytes_per_token"), int):
            c.kv_bytes_per_token = ticket["kv_bytes_per_token"]
        if tokens >= _MIN_TOKENS_TO_LEARN and seconds > c.hop_s:
            sample = (seconds - c.hop_s) / tokens
            c.prefill_s_per_token += _EWMA * (sample - c.prefill_s_per_token)
