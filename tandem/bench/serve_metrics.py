"""Serving metrics with vLLM's definitions (`vllm bench serve`), from per-request traces.

A request's trace: when it was sent, when each streamed chunk that carried choices arrived, and
the completion token count from `usage`. From it, as vLLM defines them:
- TTFT: first chunk - sent.
- ITL: the gap before every later chunk (a chunk carrying several tokens is still one gap).
- E2EL: last chunk - sent (the usage-only chunk after it does not count).
- TPOT: (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token;
  for goodput a request with at most one token has TPOT 0.
Throughputs divide by the benchmark's wall duration; failed requests count 0 output tokens.
Percentiles are numpy's linear interpolation; "std" is the population standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILE_METRICS = "ttft,tpot,itl"
DEFAULT_METRIC_PERCENTILES = "99"


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    start_time: float = 0.0  # perf_counter when sent
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds, one per chunk after the first
    latency: float = 0.0  # seconds to the last chunk with choices
    output_tokens: int = 0  # from usage.completion_tokens
    success: bool = False
    error: str = ""
    generated_text: str = ""
    group: str = "default"  # e.g. "chat" / "long" in the interference dataset

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile_label(p: float) -> str:
    return f"p{int(p)}" if float(p) == int(p) else f"p{p}"


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        slos[name] = float(value)
        if slos[name] < 0:
            raise ValueError(f"--goodput {name} must be >= 0 ms")
    return slos


def meets_slos(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    """vLLM's goodput test: every given SLO holds (TPOT of a <=1-token request counts as 0)."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] <= limit / 1000.0 for name, limit in slos_ms.items())


def _stats(name: str, values_s: list[float], percentiles: list[float], out: dict) -> None:
    ms = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    out[f"mean_{name}_ms"] = float(np.mean(ms))
    out[f"median_{name}_ms"] = float(np.median(ms))
    out[f"std_{name}_ms"] = float(np.std(ms))
    for p in percentiles:
        out[f"{percentile_label(p)}_{name}_ms"] = float(np.percentile(ms, p))


def compute_metrics(results: list[RequestResult], duration_s: float, percentiles: list[float],
                    goodput_slos_ms: dict[str, float] | None = None) -> dict:
    """vLLM's result keys (completed, failed, throughputs, {mean,median,std,pXX}_{metric}_ms)."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    out: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (sum(meets_slos(r, goodput_slos_ms) for r in ok) / duration_s
                            if goodput_slos_ms else None),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    series = {"ttft": [r.ttft for r in ok], "tpot": [t for r in ok if (t := r.tpot) is not None],
              "itl": [gap for r in ok for gap in r.itl], "e2el": [r.latency for r in ok]}
    for name in METRICS:
        _stats(name, series[name], percentiles, out)
    return out


def max_goodput(sweep: list[tuple[float, list[RequestResult]]], slos_ms: dict[str, float],
                attainment: float = 0.9) -> float | None:
    """DistServe's max goodput: the highest request rate at which at least `attainment` of the
    requests (failed ones included, as misses) meet every SLO. None if no rate qualifies."""
    best = None
    for rate, results in sweep:
        if results and sum(meets_slos(r, slos_ms) for r in results) / len(results) >= attainment:
            best = rate if best is None else max(best, rate)
    return best
