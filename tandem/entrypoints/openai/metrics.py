"""Prometheus metrics on /metrics with vLLM's names (so vLLM dashboards and routers work unchanged).

Engine-side numbers (running, waiting, KV usage, prefix-cache counters) come from the latest
EngineStats the core sent; latencies and token counts are observed here, per request stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.kv_transfer.ticket import key_id
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
_STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _buckets_1_2_5(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's buckets for token counts)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


class _EngineCollector:
    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.labels = engine, {"model_name": model_name}

    def _tokens_by_source(self, s, names: list[str]) -> CounterMetricFamily:
        c = CounterMetricFamily("vllm:prompt_tokens_by_source", "Prompt tokens by where their KV came from",
                                labels=[*names, "source"])
        for source, value in _prompt_tokens_by_source(s).items():
            c.add_metric([self.labels["model_name"], source], value)
        return c

    def collect(self):
        s = self.engine.stats
        names = ["model_name"]
        for name, doc, value in [
            ("vllm:num_requests_running", "Requests in the running batch", s.num_running if s else 0),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting if s else 0),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full", s.kv_cache_usage if s else 0.0),
            ("tandem:api_sequences_in_flight", "Sequences the API process has accepted and not yet ended "
             "(what --max-queued-requests bounds)", self.engine.num_in_flight),
            ("tandem:api_requests_tracked", "Requests the API process tracks (tokenized, not yet ended)",
             self.engine.num_tracked_requests),
        ]:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric([self.labels["model_name"]], value)
            yield g
        for name, doc, value in [
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries if s else 0),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits if s else 0),
            ("vllm:num_preemptions", "Preemptions by recompute", s.num_preemptions if s else 0),
        ]:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric([self.labels["model_name"]], value)
            yield c
        yield self._tokens_by_source(s, names)
        accepted = CounterMetricFamily("tandem:api_requests_accepted", "Requests the API process accepted")
        accepted.add_metric([], self.engine.requests_accepted)
        yield accepted
        ended = CounterMetricFamily("tandem:api_requests_ended", "Accepted requests that ended, by outcome "
                                    "(finished, aborted, failed); equal in sum to accepted when idle",
                                    labels=["outcome"])
        for outcome, count in self.engine.requests_ended.items():
            ended.add_metric([outcome], count)
        yield ended
        yield from _transfer_metrics(s.transfer if s else None)
        yield from _offload_metrics(s.offload if s else None)
        yield from _spec_decode_metrics(s.spec_decode if s else None, self.labels["model_name"])
        if self.engine.config.kv_transfer is not None:  # a router never splits across different secrets
            key = GaugeMetricFamily("tandem:kv_transfer_key_info", "Fingerprint of this worker's KV transfer "
                                    "secret (tandem.kv_transfer.ticket.key_id)", labels=["key_id"])
            key.add_metric([key_id(self.engine.config.kv_transfer.secret)], 1.0)
            yield key
        cache = self.engine.config.cache
        # cache_dtype: vLLM's label, the configured kv_cache_dtype (auto, fp8, fp8_e4m3, fp8_e5m2)
        info = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype",
                                         "calculate_kv_scales"])
        info.add_metric([str(self.engine.block_size), str(self.engine.num_blocks), str(cache.enable_prefix_caching),
                         cache.cache_dtype, str(cache.calculate_kv_scales)], 1.0)
        yield info


def _transfer_metrics(t):
    """Disaggregated workers only: KV transfer counters from the core (tandem/kv_transfer)."""
    if t is None:
        return
    for name, doc, value in [
        ("tandem:kv_transfers", "KV loads from prefill workers that completed", t.loads_ok),
        ("tandem:kv_transfers_shm", "Completed KV loads copied from shared memory on this host", t.loads_shm),
        ("tandem:kv_transfer_bytes", "KV bytes received from prefill workers", t.bytes_received),
        ("tandem:kv_transfer_seconds", "Seconds spent in completed KV loads", t.seconds_total),
        ("tandem:kv_transfer_recomputes", "Failed KV loads prefilled locally (policy recompute)", t.recomputed),
        ("tandem:kv_transfer_local_skips", "Tickets not pulled: every block was cached here", t.local_skips),
        ("tandem:kv_leases_issued", "Prefills whose blocks were leased to a decode worker", t.leases_issued),
        ("tandem:kv_leases_expired", "Leases freed at their deadline, unconfirmed", t.leases_expired),
        ("tandem:kv_bytes_sent", "KV bytes sent (TCP) or granted (shared memory) to decode workers",
         t.bytes_sent),
    ]:
        c = CounterMetricFamily(name, doc)
        c.add_metric([], value)
        yield c
    failures = CounterMetricFamily("tandem:kv_transfer_failures", "Failed KV loads by kind", labels=["kind"])
    for kind, count in sorted(t.failures.items()):
        failures.add_metric([kind], count)
    yield failures
    held = GaugeMetricFamily("tandem:kv_leases_held", "Finished prefills holding blocks for a decode worker")
    held.add_metric([], t.leases_held)
    yield held


def _prompt_tokens_by_source(s) -> dict[str, float]:
    """vLLM's split of looked-up prompt tokens: found in the device prefix cache, loaded by a
    connector (here: the KV offload tiers), or computed."""
    cached = s.prefix_cache_hits if s else 0
    external = sum(s.offload.hit_tokens.values()) if s and s.offload else 0
    queries = s.prefix_cache_queries if s else 0
    return {"local_compute": max(0, queries - cached - external), "local_cache_hit": cached,
            "external_kv_transfer": external}


def _spec_decode_metrics(sd, model_name: str):
    """With speculative decoding only: vLLM's spec_decode counters."""
    if sd is None:
        return
    for name, doc, value in [
        ("vllm:spec_decode_num_drafts", "Verified steps of a request that had draft tokens", sd.num_drafts),
        ("vllm:spec_decode_num_draft_tokens", "Draft tokens verified", sd.num_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", sd.num_accepted_tokens),
    ]:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([model_name], value)
        yield c
    per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
                                  "draft position (0 = the first)", labels=["model_name", "position"])
    for pos, value in enumerate(sd.accepted_per_pos):
        per_pos.add_metric([model_name, str(pos)], value)
    yield per_pos


def _offload_metrics(o):
    """With KV offloading only: the host (CPU) and disk tiers (tandem/kv_offload)."""
    if o is None:
        return
    for name, doc, value in [
        ("tandem:kv_offload_stored_blocks", "KV blocks copied from the device cache to the host tier", o.stored_blocks),
        ("tandem:kv_offload_stored_bytes", "KV bytes copied to the host tier", o.stored_bytes),
        ("tandem:kv_offload_store_seconds", "Seconds the offload thread spent saving blocks", o.store_seconds),
        ("tandem:kv_offload_disk_written_blocks", "KV blocks written to the disk tier", o.disk_written_blocks),
        ("tandem:kv_offload_loaded_bytes", "KV bytes loaded back from the tiers", o.loaded_bytes),
        ("tandem:kv_offload_load_seconds", "Seconds the offload thread spent loading blocks", o.load_seconds),
        ("tandem:kv_offload_load_failures", "Loads that fell back to computing the prompt", o.loads_failed),
        ("tandem:kv_offload_corrupt_files", "Disk tier files skipped (bad checksum, foreign, unreadable)",
         o.corrupt_files),
    ]:
        c = CounterMetricFamily(name, doc)
        c.add_metric([], value)
        yield c
    hits = CounterMetricFamily("tandem:kv_offload_hit_tokens", "Prompt tokens loaded from a KV offload tier "
                               "instead of computed", labels=["medium"])
    for medium in ("CPU", "DISK"):
        hits.add_metric([medium], o.hit_tokens.get(medium, 0))
    yield hits
    used = GaugeMetricFamily("tandem:kv_offload_blocks", "KV blocks held (or being written) by a tier",
                             labels=["medium"])
    total = GaugeMetricFamily("tandem:kv_offload_capacity_blocks", "KV blocks a tier can hold", labels=["medium"])
    for medium, n, cap in (("CPU", o.host_blocks_used, o.host_blocks_total),
                           ("DISK", o.disk_blocks_used, o.disk_blocks_total)):
        used.add_metric([medium], n)
        total.add_metric([medium], cap)
    yield used
    yield total


class ServerMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        label = ["model_name"]
        self.model_name = model_name

        def hist(name, doc):
            return Histogram(name, doc, label, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish")
        self.phases = {  # measured by the engine core: queued -> first scheduled -> first token -> finished
            "queue_time": hist("vllm:request_queue_time_seconds", "Time waiting before first scheduled "
                               "(a disaggregated decode leg: including its KV load)"),
            "prefill_time": hist("vllm:request_prefill_time_seconds", "First scheduled to first token"),
            "decode_time": hist("vllm:request_decode_time_seconds", "First token to finish"),
        }
        self.inference = hist("vllm:request_inference_time_seconds", "First scheduled to finish")
        # prometheus_client appends _total to counters
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", label, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", label, registry=self.registry)
        self.success = Counter("vllm:request_success", "Requests finished", label + ["finished_reason"],
                               registry=self.registry)
        # NOTE: as vLLM's (deprecated) metric of this name, one sample per output token, like the ITL
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token", label,
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds", "Mean time per output token of "
                                      "a finished request (decode time / (generated - 1))", label,
                                      buckets=_TPOT_BUCKETS, registry=self.registry)
        tokens = _buckets_1_2_5(engine.max_model_len)

        def token_hist(name, doc, buckets=tokens):
            return Histogram(name, doc, label, buckets=buckets, registry=self.registry)

        self.request_prompt_tokens = token_hist("vllm:request_prompt_tokens", "Prompt tokens of a finished request")
        self.request_generation_tokens = token_hist("vllm:request_generation_tokens",
                                                    "Tokens generated by a finished request (all its choices)")
        self.request_max_generation = token_hist("vllm:request_max_num_generation_tokens",
                                                 "Tokens of the longest choice of a finished request")
        self.params_max_tokens = token_hist("vllm:request_params_max_tokens", "max_tokens of a finished request")
        self.params_n = token_hist("vllm:request_params_n", "n of a finished request", [1, 2, 5, 10, 20])
        self.iteration_tokens = token_hist("vllm:iteration_tokens_total", "Tokens scheduled in one engine step",
                                           list(_STEP_TOKEN_BUCKETS))
        self.http_requests = Counter("http_requests", "HTTP requests by route template, method and status class",
                                     ["handler", "method", "status"], registry=self.registry)
        self.http_duration = Histogram("http_request_duration_seconds", "HTTP request duration (until the last "
                                       "byte of the response)", ["handler", "method"], registry=self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.engine = engine
        self.expert_imbalance = Histogram(
            "tandem:moe_expert_load_imbalance", "Per MoE layer and about once a second: tokens of the busiest "
            "expert over the mean per expert (1 = even)", label, buckets=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0),
            registry=self.registry)
        self.transfer_time = Histogram("tandem:kv_transfer_duration_seconds", "Duration of one KV load",
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                       registry=self.registry)

    def _observe_phases(self, metrics: dict[str, float]) -> None:
        if not all(p in metrics for p in self.phases):
            return  # ended without a token from the core (aborted, failed before its first token)
        for phase, h in self.phases.items():
            h.labels(self.model_name).observe(metrics[phase])
        self.inference.labels(self.model_name).observe(metrics["prefill_time"] + metrics["decode_time"])

    def render(self) -> bytes:
        imbalance, self.engine.expert_imbalance = self.engine.expert_imbalance, []
        for x in imbalance:
            self.expert_imbalance.labels(self.model_name).observe(x)
        durations, self.engine.transfer_durations = self.engine.transfer_durations, []
        for d in durations:
            self.transfer_time.observe(d)
        steps, self.engine.step_tokens = self.engine.step_tokens, []
        for n in steps:
            self.iteration_tokens.labels(self.model_name).observe(n)
        return generate_latest(self.registry)

    def _observe_finished(self, out: RequestOutput, params: SamplingParams | None) -> None:
        m = self.model_name
        generated = [len(c.token_ids) for c in out.outputs]
        self.request_prompt_tokens.labels(m).observe(len(out.prompt_token_ids))
        self.request_generation_tokens.labels(m).observe(sum(generated))
        self.request_max_generation.labels(m).observe(max(generated, default=0))
        if params is not None:
            self.params_n.labels(m).observe(params.n)
            if params.max_tokens is not None:
                self.params_max_tokens.labels(m).observe(params.max_tokens)
        decode = out.metrics.get("decode_time")
        if decode is not None and max(generated, default=0) > 1:
            self.request_tpot.labels(m).observe(decode / (max(generated) - 1))

    async def observe(self, stream: AsyncIterator[RequestOutput],
                      params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, timing its tokens (one ITL sample per token; a step that
        brings several tokens spreads its gap over them, as vLLM does). TTFT and end-to-end latency
        count from the request's arrival (it is added before its stream is first read)."""
        start = last = time.monotonic()
        seen = 0
        m = self.model_name
        async for out in stream:
            now = time.monotonic()
            if seen == 0:
                start = last = min(start, out.metrics.get("arrival_time", start))
            tokens = sum(len(c.token_ids) for c in out.outputs)
            if tokens > seen:
                if seen == 0:
                    self.ttft.labels(m).observe(now - start)
                else:
                    gap = (now - last) / (tokens - seen)
                    for _ in range(tokens - seen):
                        self.itl.labels(m).observe(gap)
                        self.tpot.labels(m).observe(gap)
                last, seen = now, tokens
            if out.finished:
                self.e2e.labels(m).observe(now - start)
                self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                self.generation_tokens.labels(m).inc(tokens)
                for c in out.outputs:
                    self.success.labels(m, c.finish_reason or "abort").inc()
                self._observe_phases(out.metrics)
                self._observe_finished(out, params)
            yield out


class HTTPMetrics:
    """ASGI middleware: http_requests_total{handler, method, status} and
    http_request_duration_seconds{handler, method}, as prometheus-fastapi-instrumentator names them
    (vLLM's server exposes these). ``handler`` is the route's template ("none" for no route), and
    ``status`` its class ("2xx"), so no client can grow the label sets."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # the router put the matched route in the scope; nothing matched: "none"
            handler, method = getattr(scope.get("route"), "path", "none"), scope.get("method", "")
            self.metrics.http_requests.labels(handler, method, f"{status // 100}xx").inc()
            self.metrics.http_duration.labels(handler, method).observe(time.perf_counter() - started)
