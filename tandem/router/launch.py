"""`tandem router` (a front over given workers) and `tandem up` (N local workers + the router).

`tandem up --prefill P --decode D` starts P workers with --role prefill and D with --role decode,
sharing one fresh KV transfer secret; the router then runs the P/D decider (tandem/router/pd.py).
`tandem up` divides the machine's cores between the workers (OMP_NUM_THREADS), gives every
worker a KV-event PUB and replay endpoint signed with one fresh secret, waits until all are
healthy, then serves the router in this process. Ctrl-C / SIGTERM stop the router, then the
workers (SIGTERM, which drains them; SIGKILL after 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tandem.engine.arg_utils import EngineArgs
from tandem.entrypoints.http_protocol import add_timeout_args
from tandem.lifecycle import exit_on_sigterm, terminate_with_parent
from tandem.router.app import Router, RouterMetrics, serve_router
from tandem.router.index import ApproxPrefixIndex, KVEventSubscriber, PrefixIndex
from tandem.router.pd import PDCosts, PDDecider, kv_bytes_per_token_from_config
from tandem.router.workers import WorkerPool, WorkerSpec

POLICIES = ("cache-aware", "least-load", "round-robin")


class CombinedMatcher:
    """Exact matches (KV events) for workers that publish them, routing history for the rest."""

    def __init__(self, index: PrefixIndex, approx: ApproxPrefixIndex, evented: set[str]) -> None:
        self.index, self.approx, self.evented = index, approx, evented

    def match_blocks(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        exact = self.index.match_blocks(block_hashes)
        guessed = self.approx.match_blocks(block_hashes)
        out = {w: n for w, n in guessed.items() if w not in self.evented}
        out.update({w: n for w, n in exact.items() if w in self.evented})
        return out

    def match_weighted(self, block_hashes: Sequence[bytes]) -> dict[str, float]:
        exact = self.index.match_weighted(block_hashes)
        guessed = self.approx.match_weighted(block_hashes)
        out = {w: n for w, n in guessed.items() if w not in self.evented}
        out.update({w: n for w, n in exact.items() if w in self.evented})
        return out

    def num_blocks(self, worker: str) -> int:
        """Device blocks of an evented worker (``PrefixIndex.num_blocks``), else routed ones."""
        return (self.index if worker in self.evented else self.approx).num_blocks(worker)


def add_router_args(p: argparse.ArgumentParser, with_workers: bool = True) -> argparse.ArgumentParser:
    if with_workers:
        p.add_argument("--worker", action="append", required=True, type=WorkerSpec.parse,
                       help="http://host:port[,events=tcp://...][,replay=tcp://...][,role=prefill|decode|both]; "
                            "repeat per worker. KV events are verified with $TANDEM_KV_EVENTS_SECRET (required "
                            "with events=)")
        p.add_argument("--tokenizer", default=None,
                       help="local tokenizer directory (prefix-aware routing needs the workers' token ids)")
    p.add_argument("--policy", choices=POLICIES, default="cache-aware")
    p.add_argument("--config", default=None, help="router.yaml: filters, scorers and weights, picker, "
                                                                "tier_weights (offload medium -> weight)")
    if with_workers:
        p.add_argument("--block-size", type=int, default=EngineArgs.block_size,
                       help="the workers' KV block size (default: %(default)s, the engine's)")
    else:  # tandem up: one value for the router and the workers it starts (worker_block_size)
        p.add_argument("--block-size", type=int, default=None,
                       help="KV block size of the workers and the router; given to the workers unless "
                            f"--worker-args sets it (default: theirs, else {EngineArgs.block_size})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=None, help="seed the picker's tie-breaks")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' of clients, checked here before "
                                                   "the body is read (or $TANDEM_API_KEY); tandem up gives it to the "
                                                   "workers too")
    add_timeout_args(p)
    pd = p.add_argument_group("P/D decider (when some worker has role prefill or decode)")
    pd.add_argument("--pd-threshold", type=int, default=None,
                    help="split iff the decode worker lacks at least N prompt tokens (llm-d's rule) "
                         "instead of comparing costs")
    pd.add_argument("--pd-interference-weight", type=float, default=1.0,
                    help="weight of the stall a local prefill inflicts on the decode worker's running streams")
    pd.add_argument("--pd-prefill-ms-per-token", type=float, default=0.3,
                    help="initial prefill cost per token (learned from prefill legs as they complete)")
    pd.add_argument("--pd-hop-ms", type=float, default=10.0, help="extra latency of the prefill leg's round trip")
    pd.add_argument("--pd-concurrent", action=argparse.BooleanOptionalAction, default=True,
                    help="send the decode leg together with the prefill leg, with a pending ticket signed here "
                         "(needs $TANDEM_KV_TRANSFER_SECRET for a standalone router; tandem up has it); the "
                         "decode worker then holds the prompt's blocks while the prefill runs")
    return p


def _load_tokenizer(path: str | None):
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_router(specs: list[WorkerSpec], args, secret: bytes | None,
                 kv_secret: bytes | None = None) -> tuple[Router, list[KVEventSubscriber]]:
    import random

    from tandem.router.policy import build_policy, read_policy_file, tier_weights_of

    config = read_policy_file(args.config) if args.config else None
    index, approx = PrefixIndex(tier_weights=tier_weights_of(config)), ApproxPrefixIndex()
    evented = {s.url for s in specs if s.events}
    matcher = CombinedMatcher(index, approx, evented)
    rng = random.Random(args.seed)
    policy = build_policy(config, matcher) if config is not None else build_policy(args.policy, matcher, rng=rng)

    def on_down(url: str) -> None:
        index.remove_worker(url)
        approx.remove_worker(url)

    pool = WorkerPool(specs, on_down)
    pd = None
    if any(s.role != "both" for s in specs):
        costs = PDCosts(args.pd_prefill_ms_per_token / 1000, hop_s=args.pd_hop_ms / 1000,
                        interference_weight=args.pd_interference_weight,
                        kv_bytes_per_token=kv_bytes_per_token_from_config(args.tokenizer))
        pd = PDDecider(costs, args.block_size, args.pd_threshold)
    subscribers = [KVEventSubscriber(index, s.url, s.events, s.replay, secret) for s in specs if s.events]
    decision = Path(args.config).stem if args.config else args.policy
    router = Router(pool, policy, _load_tokenizer(args.tokenizer), args.block_size, matcher, approx,
                    RouterMetrics(), decision, pd, kv_secret, args.pd_concurrent)
    return router, subscribers


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get("TANDEM_API_KEY")


def _client_bounds(args) -> dict:
    """serve_router's keyword arguments for the API key and the client time bounds."""
    return {"api_key": _api_key(args), "head_timeout_s": args.head_timeout_s, "body_timeout_s": args.body_timeout_s,
            "keep_alive_timeout_s": args.keep_alive_timeout_s}


def run_router(args) -> int:
    secret = os.environ.get("TANDEM_KV_EVENTS_SECRET")
    if not secret and any(s.events or s.replay for s in args.worker):
        # unsigned batches could be forged by anyone who reaches the endpoint; workers refuse to
        # publish without a secret anyway
        raise ValueError("KV events (events=/replay= in --worker) need $TANDEM_KV_EVENTS_SECRET, the workers' value")
    kv_secret = os.environ.get("TANDEM_KV_TRANSFER_SECRET")
    router, subscribers = build_router(args.worker, args, secret.encode() if secret else None,
                                       kv_secret.encode() if kv_secret else None)
    return asyncio.run(serve_router(router, args.host, args.port, subscribers,
                                    on_ready=lambda: print(f"router on http://{args.host}:{args.port}", flush=True),
                                    **_client_bounds(args)))


# --------------------------------------------------------------------------- tandem up
def add_up_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--replicas", type=int, default=2, help="colocated workers (role both)")
    p.add_argument("--prefill", type=int, default=0, help="disaggregated: this many prefill workers ...")
    p.add_argument("--decode", type=int, default=0, help="... and this many decode workers (instead of --replicas)")
    p.add_argument("--worker-args", default="", help="extra `tandem serve` flags for every worker, one string "
                                                     "(engine flags such as --max-num-seqs go here, verbatim)")
    add_router_args(p, with_workers=False)
    return p


def worker_block_size(block_size: int | None, extra: list[str]) -> tuple[int, list[str]]:
    """One block size for the router's hashes and the workers' caches: ``tandem up --block-size N``
    is passed to the workers, a --block-size inside --worker-args is read back for the router, and
    two different values are an error. Returns (block size, worker flags)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--block-size", type=int, default=None)
    given = probe.parse_known_args(extra)[0].block_size
    if block_size is None:
        return (given if given is not None else EngineArgs.block_size), extra
    if given is not None and given != block_size:
        raise ValueError(f"--block-size {block_size} disagrees with --block-size {given} in --worker-args")
    return block_size, extra if given is not None else [*extra, "--block-size", str(block_size)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(model: str, roles: list[str], extra: list[str], secret: str,
                   api_key: str | None = None) -> tuple[list[subprocess.Popen], list[WorkerSpec]]:
    threads = max(1, (os.cpu_count() or 1) // len(roles))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TANDEM_KV_EVENTS_SECRET": secret}
    if api_key:  # the router passes the client's Authorization header on: the same key everywhere
        env["TANDEM_API_KEY"] = api_key
    if any(r != "both" for r in roles):
        env["TANDEM_KV_TRANSFER_SECRET"] = secret
    procs, specs = [], []
    for role in roles:
        port, events, replay = _free_port(), f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "tandem.cli", "serve", model, "--port", str(port), "--role", role,
               "--kv-events-endpoint", events, "--kv-events-replay-endpoint", replay, *extra]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=terminate_with_parent))
        specs.append(WorkerSpec(f"http://127.0.0.1:{port}", events, replay, role))
    return procs, specs


def _wait_healthy(procs: list[subprocess.Popen], specs: list[WorkerSpec], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {s.url for s in specs}
    while pending:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not healthy after {timeout_s:.0f} s: {sorted(pending)}")
        for url in list(pending):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        time.sleep(0.3)


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def _roles(args) -> list[str]:
    if args.prefill or args.decode:
        if args.prefill < 1 or args.decode < 1:
            raise ValueError("disaggregated serving needs --prefill >= 1 and --decode >= 1")
        return ["prefill"] * args.prefill + ["decode"] * args.decode
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    return ["both"] * args.replicas


def run_up(args) -> int:
    import shlex

    from tandem.engine.arg_utils import default_model_path

    roles = _roles(args)
    model = args.model or default_model_path()
    exit_on_sigterm()  # a SIGTERM while the workers start still stops them (the finally below)
    secret = secrets.token_hex(32)  # fresh per fleet: signs every worker's KV events (and KV transfers)
    args.block_size, extra = worker_block_size(args.block_size, shlex.split(args.worker_args))
    procs, specs = _start_workers(model, roles, extra, secret, _api_key(args))
    try:
        _wait_healthy(procs, specs)
        args.tokenizer = model
        router, subscribers = build_router(specs, args, secret.encode(), secret.encode())
        ready = f"tandem up: {len(specs)} workers ({', '.join(f'{s.url} {s.role}' for s in specs)}) behind " \
                f"http://{args.host}:{args.port} (policy {args.policy})"
        return asyncio.run(serve_router(router, args.host, args.port, subscribers,
                                        on_ready=lambda: print(ready, flush=True), **_client_bounds(args)))
    finally:
        _stop_workers(procs)
