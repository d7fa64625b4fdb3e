"""`tandem bench serve`: an async streaming client for any OpenAI-compatible server (tandem, vLLM,
SGLang) with `vllm bench serve`'s flags, definitions and JSON keys (see serve_metrics.py).

Arrivals: with --request-rate R the gaps are gamma(shape=burstiness, scale=1/(R*burstiness))
(Poisson at burstiness 1), cumulated and rescaled so the last request is sent at num_prompts/R,
as vLLM does; inf sends all at once. --max-concurrency caps requests in flight. Requests of a
dataset with a fixed schedule (interference's long documents) are sent at their own times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from tandem.bench.serve_datasets import ServeRequest, add_dataset_args, build_requests
from tandem.bench.serve_metrics import (
    DEFAULT_METRIC_PERCENTILES,
    DEFAULT_PERCENTILE_METRICS,
    RequestResult,
    compute_metrics,
    max_goodput,
    parse_goodput,
)

ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--backend", choices=sorted(ENDPOINTS), default="openai")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (default: --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default: /v1/completions, or chat for openai-chat")
    p.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: --model if a directory)")
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--metrics-url", action="append", default=None,
                   help="server whose /metrics counters to read before and after (repeat per worker behind a "
                        "router; default: --base-url)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--percentile-metrics", default=DEFAULT_PERCENTILE_METRICS)
    p.add_argument("--metric-percentiles", default=DEFAULT_METRIC_PERCENTILES)
    p.add_argument("--sweep", default=None, metavar="request-rate=R1,R2,...",
                   help="run once per rate; with --goodput, report the max goodput (>= 90%% of requests meet every SLO)")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="also keep generated texts")
    p.add_argument("--result-dir", default="benchmarks/results")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--plot", action="store_true", help="write PNG plots next to the result")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--request-timeout", type=float, default=6 * 3600)
    add_dataset_args(p)
    return p


# --------------------------------------------------------------------------- one request
def _payload(args, model: str, req: ServeRequest) -> dict:
    body: dict = {"model": model, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.backend == "openai-chat":
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                   [{"role": "user", "content": req.prompt}]
        return {**body, "messages": messages, "max_completion_tokens": req.expected_output_len}
    return {**body, "prompt": (req.system or "") + req.prompt, "max_tokens": req.expected_output_len}


def _chunk_text(choice: dict) -> str:
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(http: httpx.AsyncClient, url: str, payload: dict, req: ServeRequest) -> RequestResult:
    """Stream one request; a chunk with choices is a token event (vLLM's rule), usage gives the count."""
    res = RequestResult(req.prompt_len, req.expected_output_len, group=req.group)
    res.start_time = start = time.perf_counter()
    last = start
    text: list[str] = []
    try:
        async with http.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                data = line.strip().removeprefix("data:").strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    return res
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if not res.success:
                        res.ttft, res.success = now - start, True
                    else:
                        res.itl.append(now - last)
                    last = now
                    text.append(_chunk_text(chunk["choices"][0]))
                elif chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.success, res.error = False, f"{type(e).__name__}: {e}"
        return res
    res.latency = last - start
    res.generated_text = "".join(text)
    if res.success and not res.output_tokens:  # server sent no usage: count chunks (lower bound)
        res.output_tokens = 1 + len(res.itl)
    return res


# --------------------------------------------------------------------------- arrivals
def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send offsets in seconds, the same as `vllm bench serve --seed` draws: gamma gaps from numpy's
    legacy generator seeded with the seed, one draw per request, cumulated, rescaled to end at n / rate."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {rate}")
    if rate == float("inf") or n == 0:  # n == 0: every request has its own send time
        return [0.0] * n
    legacy = np.random.RandomState(seed)
    gaps = [1.0 / rate] * n if burstiness == float("inf") else \
        [legacy.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)) for _ in range(n)]
    times = np.cumsum(gaps)
    return (times * ((n / rate) / times[-1])).tolist() if times[-1] > 0 else times.tolist()


async def _run_schedule(http, url, args, model, requests: list[ServeRequest], progress) -> tuple[list, float]:
    free = [r for r in requests if r.send_at is None]
    offsets = iter(arrival_times(len(free), args.request_rate, args.burstiness, args.seed))
    schedule = sorted(((r.send_at if r.send_at is not None else next(offsets), i) for i, r in enumerate(requests)))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    results: list[RequestResult | None] = [None] * len(requests)

    async def one(i: int) -> None:
        payload = _payload(args, model, requests[i])
        if limit is None:
            results[i] = await send_request(http, url, payload, requests[i])
        else:
            async with limit:
                results[i] = await send_request(http, url, payload, requests[i])
        if progress is not None:
            progress.update(1)

    start = time.perf_counter()
    tasks = []
    for at, i in schedule:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    done = [r for r in results if r is not None]  # gather returned: every slot is filled
    for r in done:
        r.start_time -= start
    return done, duration


# --------------------------------------------------------------------------- server info
def _server_counters(base_urls: list[str]) -> dict[str, float]:
    """vLLM-named Prometheus counters of interest, summed over label sets and servers; a server
    without /metrics adds nothing."""
    out: dict[str, float] = {}
    for base_url in base_urls:
        try:
            text = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
                     "vllm:generation_tokens", "vllm:request_success"):
            pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.M)
            values = [float(v) for v in pattern.findall(text)]
            if values:
                out[name] = out.get(name, 0.0) + sum(values)
    return out


def _prefix_hit_rate(before: dict, after: dict) -> float | None:
    queries = after.get("vllm:prefix_cache_queries", 0) - before.get("vllm:prefix_cache_queries", 0)
    hits = after.get("vllm:prefix_cache_hits", 0) - before.get("vllm:prefix_cache_hits", 0)
    return hits / queries if queries > 0 else None


def _served_model(base_url: str) -> str:
    data = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    return data[0]["id"]


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    path = args.tokenizer or args.model
    if not path or not Path(path).is_dir():
        raise ValueError("give --tokenizer DIR (a local Hugging Face tokenizer): prompts are built and "
                         "counted with the model's tokenizer")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------- one run
def _result_json(args, model: str, results: list[RequestResult], duration: float, slos: dict,
                 before: dict, after: dict) -> dict:
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    metrics = compute_metrics(results, duration, percentiles, slos or None)
    wanted = set(args.percentile_metrics.split(","))
    metrics = {k: v for k, v in metrics.items()
               if not k.endswith("_ms") or k.split("_")[-2] in wanted}
    groups = sorted({r.group for r in results})
    out = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend, "endpoint": args.endpoint, "label": args.label, "model_id": model,
        "tokenizer_id": args.tokenizer or args.model, "num_prompts": len(results),
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        **metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results], "start_times": [r.start_time for r in results],
        "groups_of_requests": [r.group for r in results],
        "errors": [r.error for r in results],
        "server_metrics": {"before": before, "after": after, "prefix_cache_hit_rate": _prefix_hit_rate(before, after)},
        "workload": {k: v for k, v in vars(args).items() if k.startswith(("dataset", "random", "prefix_rep",
                                                                            "shared_prefix", "sharegpt",
                                                                            "interference"))},
        "flags": " ".join(sys.argv[1:]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if len(groups) > 1 and args.dataset_name in ("interference", "multi-turn"):
        out["groups"] = {g: compute_metrics([r for r in results if r.group == g], duration, percentiles, slos or None)
                         for g in groups}
    if args.save_detailed:
        out["generated_texts"] = [r.generated_text for r in results]
    return out


async def _warmup(http, url, args, model, requests: list[ServeRequest]) -> None:
    for req in requests[:args.num_warmups]:
        await send_request(http, url, _payload(args, model, req), req)


async def _run_once(args, model: str, requests: list[ServeRequest]) -> tuple[list[RequestResult], float]:
    url = args.base_url + args.endpoint
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as http:
        await _warmup(http, url, args, model, requests)
        progress = None
        if not args.disable_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(requests), desc="requests")
        try:
            return await _run_schedule(http, url, args, model, requests, progress)
        finally:
            if progress is not None:
                progress.close()


def _summary(result: dict) -> str:
    lines = [f"{'Successful requests:':40}{result['completed']}", f"{'Failed requests:':40}{result['failed']}",
             f"{'Benchmark duration (s):':40}{result['duration']:.2f}",
             f"{'Request throughput (req/s):':40}{result['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':40}{result['output_throughput']:.2f}"]
    if result.get("request_goodput") is not None:
        lines.append(f"{'Request goodput (req/s):':40}{result['request_goodput']:.2f}")
    for key, value in result.items():
        if key.endswith("_ms") and not key.startswith("std_"):
            lines.append(f"{key + ':':40}{value:.2f}")
    if result["server_metrics"]["prefix_cache_hit_rate"] is not None:
        lines.append(f"{'Server prefix cache hit rate:':40}{result['server_metrics']['prefix_cache_hit_rate']:.1%}")
    return "\n".join(lines)


def _parse_sweep(spec: str) -> list[float]:
    name, _, values = spec.partition("=")
    if name != "request-rate" or not values:
        raise ValueError(f"--sweep takes request-rate=R1,R2,..., got {spec!r}")
    return [float(v) for v in values.split(",")]


def _save(args, result: dict, kind: str) -> Path:
    name = args.result_filename or \
        f"serve-{kind}-{args.backend}-{re.sub(r'[^A-Za-z0-9._-]', '_', str(result.get('model_id', 'model')))}-" \
        f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path = Path(args.result_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def run_serve(args) -> dict:
    """Run the benchmark (or a sweep of request rates); returns the result dict."""
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    args.endpoint = args.endpoint or ENDPOINTS[args.backend]
    slos = parse_goodput(args.goodput)
    model = args.model if args.model and not Path(args.model).is_dir() else _served_model(args.base_url)
    requests = build_requests(_load_tokenizer(args), args)
    rates = _parse_sweep(args.sweep) if args.sweep else [args.request_rate]
    metrics_urls = args.metrics_url or [args.base_url]
    runs = []
    for rate in rates:
        args.request_rate = rate
        before = _server_counters(metrics_urls)
        results, duration = asyncio.run(_run_once(args, model, requests))
        result = _result_json(args, model, results, duration, slos, before, _server_counters(metrics_urls))
        print(_summary(result))
        runs.append((rate, results, result))
    if args.sweep:
        final = {"sweep": [r for _, _, r in runs], "goodput_slos_ms": slos,
                 "max_goodput": max_goodput([(rate, res) for rate, res, _ in runs], slos) if slos else None}
        print(f"max goodput (req/s at which >= 90% meet every SLO): {final['max_goodput']}")
    else:
        final = runs[0][2]
    if args.save_result or args.plot:
        path = _save(args, final, "sweep" if args.sweep else "run")
        print(f"wrote {path}")
        if args.plot:
            _plot(final, path.with_suffix(""))
    return final


def _plot(result: dict, out_dir: Path) -> None:
    from tandem.bench import plots

    if "sweep" in result:
        written = [plots.plot_goodput_vs_rate(result, out_dir),
                   plots.plot_latency_cdfs({str(r["request_rate"]): r for r in result["sweep"]}, out_dir)]
    else:
        written = [plots.plot_latency_cdfs({result.get("label") or "run": result}, out_dir),
                   plots.plot_token_timeline(result, out_dir)]
    print("plots: " + ", ".join(str(p) for p in written))


def build_parser_for_tests() -> argparse.ArgumentParser:
    """The `tandem bench serve` flags on their own parser."""
    return add_serve_args(argparse.ArgumentParser(prog="tandem bench serve"))
