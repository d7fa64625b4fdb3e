"""`tandem bench soak`: mixed traffic against `tandem up --replicas 2` for a long while, with
clients that leave, bad inputs, and one worker SIGKILLed and restarted half-way.

What it checks, and writes to ``benchmarks/results/soak-*.json``:
- every request the client sent has exactly one outcome (ok, aborted by the client, rejected with
  a 4xx, failed), and no 5xx other than those of requests in flight on the killed worker;
- every worker's own account balances at the end: requests accepted = finished + aborted + failed,
  nothing running or waiting, no KV block held (``vllm:kv_cache_usage_perc`` 0), no sequence in
  flight; the router's in-flight count is back to 0;
- the killed worker's engine core exits on its own, and the restarted worker takes traffic again;
- resident memory of every process after warm-up: the median of the first window against the
  median of the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tandem.bench.throughput import describe_device, model_shape
from tandem.engine.arg_utils import DEMO_MODEL_DIR

KINDS = {  # kind -> weight in the mix
    "complete": 30, "stream_chat": 20, "n2": 5, "leave_stream": 15, "leave_waiting": 10, "bad": 20,
}
BAD_BODIES: list[Any] = [
    {"prompt": "x", "top_k": 2**31}, {"prompt": "x", "priority": 1e30}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "logit_bias": {"²": 1}}, {"prompt": [2**70] * 32}, {"prompt": "\ud800"},
    {"prompt": ["a"] * 300}, {"prompt": "x", "n": 129}, {"prompt": "x", "max_tokens": 10**6},
    {"prompt": "x", "model": "no-such-model"}, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    "[" * 5000, b'{"prompt": "\xff"}', {"prompt": ""},
]


@dataclass
class Tally:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> outcome -> n
    server_errors: list[str] = field(default_factory=list)
    failure_times: list[float] = field(default_factory=list)  # monotonic clock
    started: float = field(default_factory=time.monotonic)

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        per_kind = self.counts.setdefault(kind, {})
        per_kind[outcome] = per_kind.get(outcome, 0) + 1
        if outcome == "failed":
            self.failure_times.append(time.monotonic() - self.started)
            if len(self.server_errors) < 50:
                self.server_errors.append(f"t={self.failure_times[-1]:.1f}s {kind}: {detail[:200]}")


# -- processes ----------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Worker:
    url: str
    pid: int  # the API process (`tandem serve`)
    core_pid: int
    argv: list[str]
    env: dict[str, str]

    @classmethod
    def find(cls, url: str, fleet_pid: int) -> Worker:
        port = url.rsplit(":", 1)[1]
        for pid in _children(fleet_pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            args = [a.decode() for a in argv]
            if "serve" in args and "--port" in args and args[args.index("--port") + 1] == port:
                env = dict(item.decode().split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes()
                           .split(b"\0") if b"=" in item)
                return cls(url, pid, _core_of(pid), args, env)
        raise RuntimeError(f"no tandem serve process for {url} under pid {fleet_pid}")


def _core_of(pid: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in _children(pid):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():  # not the resource tracker
                return child
        time.sleep(0.5)
    raise RuntimeError(f"no engine core under {pid}")


# -- traffic ------------------------------------------------------------------------------------------
async def _one(http: httpx.AsyncClient, base: str, model: str, kind: str, rng: random.Random, tally: Tally) -> None:
    prompt = f"{rng.choice(['def ', 'class ', 'import ', '# '])}{rng.choice(['parse', 'render', 'fetch'])}" \
             f"_{rng.randrange(50)}(" * rng.randint(1, 6)
    completion = {"model": model, "prompt": prompt, "max_tokens": rng.randint(8, 48), "temperature": 0.8}
    try:
        if kind == "bad":
            await _bad(http, base, model, rng, tally)
        elif kind in ("complete", "n2"):
            body = {**completion, "n": 2} if kind == "n2" else completion
            r = await http.post(f"{base}/v1/completions", json=body)
            tally.add(kind, _status_outcome(r.status_code), r.text)
        elif kind == "leave_waiting":
            try:
                r = await http.post(f"{base}/v1/completions", json={**completion, "max_tokens": 200,
                                                                    "ignore_eos": True},
                                    timeout=rng.uniform(0.05, 1.0))
                tally.add(kind, _status_outcome(r.status_code), r.text)
            except httpx.TimeoutException:
                tally.add(kind, "aborted")
        else:
            chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                    "max_tokens": rng.randint(8, 64), "stream_options": {"include_usage": True}}
            await _stream(http, base, chat, kind, rng.randint(1, 5) if kind == "leave_stream" else None, tally)
    except httpx.HTTPError as e:
        tally.add(kind, "failed", f"{type(e).__name__}: {e}")


async def _stream(http: httpx.AsyncClient, base: str, body: dict, kind: str, leave_after: int | None,
                  tally: Tally) -> None:
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally.add(kind, _status_outcome(r.status_code), (await r.aread()).decode(errors="replace"))
            return
        chunks = 0
        async for line in r.aiter_lines():
            if line.startswith('data: {"error"'):
                tally.add(kind, "failed", line)
                return
            if line.startswith("data: {"):
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    tally.add(kind, "aborted")
                    return  # leaving the context closes the connection mid-stream
        tally.add(kind, "ok" if leave_after is None else "finished_before_leaving")


async def _bad(http: httpx.AsyncClient, base: str, model: str, rng: random.Random, tally: Tally) -> None:
    body = rng.choice(BAD_BODIES)
    if isinstance(body, dict):
        payload = json.dumps({"model": model, "max_tokens": 4, **body}).encode("utf-8", "surrogatepass")
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    else:
        payload, path = body.encode() if isinstance(body, str) else body, "/v1/completions"
    r = await http.post(f"{base}{path}", content=payload, headers={"content-type": "application/json"})
    tally.add("bad", _status_outcome(r.status_code, expect_rejection=True), r.text)


def _status_outcome(status: int, expect_rejection: bool = False) -> str:
    if status == 200:
        return "accepted_bad_input" if expect_rejection else "ok"
    if 400 <= status < 500:
        return "rejected"
    return "failed"


async def _client(base: str, model: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < deadline:
            await _one(http, base, model, rng.choices(kinds, weights)[0], rng, tally)


# -- the run ------------------------------------------------------------------------------------------
def _metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _wait_healthy(url: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def _worker_account(url: str) -> dict[str, float]:
    m = _metrics(url)
    prefix = 'tandem:api_requests_ended_total{outcome="'
    ended = {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if line.startswith(prefix)}
    return {"accepted": m.get("tandem:api_requests_accepted_total", 0.0),
            "ended": m.get("tandem:api_requests_ended_total", 0.0), **ended,
            "running": m.get("vllm:num_requests_running", 0.0), "waiting": m.get("vllm:num_requests_waiting", 0.0),
            "kv_cache_usage_perc": m.get("vllm:kv_cache_usage_perc", 0.0),
            "sequences_in_flight": m.get("tandem:api_sequences_in_flight", 0.0),
            "requests_tracked": m.get("tandem:api_requests_tracked", 0.0)}


def _memory_verdict(samples: list[tuple[float, float]], warmup_s: float, window_s: float) -> dict[str, Any]:
    """(elapsed s, RSS MiB) samples -> medians of the first window after warm-up and of the last window."""
    after = [(t, m) for t, m in samples if t >= warmup_s]
    if not after:
        return {"samples": len(samples)}
    start, end = after[0][0], after[-1][0]
    first = sorted(m for t, m in after if t <= start + window_s)
    last = sorted(m for t, m in after if t >= end - window_s)
    med_first, med_last = first[len(first) // 2], last[len(last) // 2]
    return {"samples": len(samples), "first_window_median_mib": round(med_first, 1),
            "last_window_median_mib": round(med_last, 1), "growth_mib": round(med_last - med_first, 1),
            "peak_mib": round(max(m for _, m in samples), 1)}


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    port = args.port
    base = f"http://127.0.0.1:{port}"
    worker_args = f"--kv-cache-memory {args.kv_cache_memory} --served-model-name {args.served_model_name} " \
                  f"--max-num-seqs {args.max_num_seqs}"
    cmd = [sys.executable, "-m", "tandem.cli", "up", args.model, "--replicas", "2", "--port", str(port),
           "--worker-args", worker_args]
    log = open(args.log, "w") if args.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the fleet
    fleet = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    report: dict[str, Any] = {}
    try:
        _wait_healthy(base, 600)
        urls = sorted({k.split('worker="')[1].split('"')[0] for k in httpx.get(f"{base}/metrics").text.splitlines()
                       if k.startswith("tandem_router_requests_in_flight{")})
        workers = [Worker.find(u, fleet.pid) for u in urls]
        report = asyncio.run(_drive(args, base, fleet.pid, workers))
    finally:
        fleet.send_signal(signal.SIGTERM)
        try:
            fleet.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)
        for w in report.get("_restarted", []):
            if w.poll() is None:
                w.terminate()
                w.wait(60)
    report.pop("_restarted", None)
    report.update(benchmark="soak: tandem up --replicas 2, mixed traffic, aborts, bad inputs, a worker killed",
                  date=dt.datetime.now(dt.UTC).isoformat(), device=describe_device(),
                  model=model_shape(args.model), flags=" ".join(sys.argv[1:]), fleet_command=" ".join(cmd[2:]))
    return report


async def _drive(args: argparse.Namespace, base: str, fleet_pid: int, workers: list[Worker]) -> dict[str, Any]:
    tally = Tally()
    started = tally.started
    deadline = started + args.duration_s
    clients = [asyncio.create_task(_client(base, args.served_model_name, args.seed + i, deadline, tally))
               for i in range(args.concurrency)]
    memory: dict[str, list[tuple[float, float]]] = {}
    kill: dict[str, Any] = {}
    restarted: list[subprocess.Popen] = []
    next_sample = started
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            _sample_memory(memory, now - started, fleet_pid, workers)
            next_sample = now + args.sample_every_s
        if not kill and now - started >= args.kill_at_s:
            kill = await asyncio.to_thread(_kill_and_restart, workers, 1, restarted, started)
        await asyncio.sleep(0.5)
    await asyncio.gather(*clients)
    idle_after = await asyncio.to_thread(_wait_idle, base, [w.url for w in workers], 120)
    accounts = {w.url: _worker_account(w.url) for w in workers}
    sent = sum(sum(v.values()) for v in tally.counts.values())
    warmup = args.warmup_s
    return {
        "workload": {"duration_s": args.duration_s, "concurrency": args.concurrency, "mix": KINDS,
                     "kill_at_s": args.kill_at_s, "warmup_s": warmup, "max_num_seqs": args.max_num_seqs,
                     "kv_cache_memory": args.kv_cache_memory},
        "requests_sent": sent, "outcomes": tally.counts, "failed_samples": tally.server_errors,
        "failed_outside_kill_window": _outside(tally.failure_times, kill),
        "worker_accounts_at_end": accounts, "idle_after_s": idle_after,
        "router_in_flight_at_end": _metrics(base).get("tandem_router_requests_in_flight", 0.0),
        "kill": kill,
        "memory": {name: _memory_verdict(s, warmup if "restarted" not in name else kill.get("restarted_at_s", 0)
                                         + warmup, args.window_s) for name, s in memory.items()},
        "memory_samples": {name: [(round(t), round(m, 1)) for t, m in s] for name, s in memory.items()},
        "_restarted": restarted,
    }


def _outside(times: list[float], kill: dict[str, Any], grace_s: float = 5.0) -> int:
    """Failures not explained by the kill: outside [killed, restarted + grace]."""
    start, end = kill.get("killed_at_s", float("inf")), kill.get("restarted_at_s", float("inf")) + grace_s
    return sum(1 for t in times if not start <= t <= end)


def _sample_memory(memory: dict[str, list[tuple[float, float]]], elapsed: float, fleet_pid: int,
                   workers: list[Worker]) -> None:
    procs = {"router": fleet_pid}
    for i, w in enumerate(workers):
        tag = f"worker{i}" + ("_restarted" if w.env.get("_SOAK_RESTARTED") else "")
        procs[f"{tag}_api"], procs[f"{tag}_core"] = w.pid, w.core_pid
    for name, pid in procs.items():
        rss = _rss_mib(pid)
        if rss is not None:
            memory.setdefault(name, []).append((elapsed, rss))


def _kill_and_restart(workers: list[Worker], index: int, restarted: list[subprocess.Popen],
                      started: float) -> dict[str, Any]:
    """SIGKILL one worker's API process, time its engine core's exit, start it again the same way."""
    victim = workers[index]
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    while _alive(victim.core_pid) and time.monotonic() - killed_at < 60:
        time.sleep(0.05)
    core_exit_s = time.monotonic() - killed_at
    env = {**victim.env, "_SOAK_RESTARTED": "1"}
    proc = subprocess.Popen(victim.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    restarted.append(proc)
    ready_s = _wait_healthy(victim.url, 600)
    workers[index] = Worker(victim.url, proc.pid, _core_of(proc.pid), victim.argv, env)
    # killed_at_s and restarted_at_s stay unrounded: failures are judged against them to the instant
    return {"worker": victim.url, "killed_at_s": killed_at - started,
            "engine_core_exited_after_s": round(core_exit_s, 2), "core_still_alive": _alive(victim.core_pid),
            "restarted_healthy_after_s": round(ready_s + core_exit_s, 1),
            "restarted_at_s": time.monotonic() - started}


def _wait_idle(base: str, urls: list[str], timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        accounts = [_worker_account(u) for u in urls]
        if all(a["running"] == a["waiting"] == a["kv_cache_usage_perc"] == a["sequences_in_flight"]
               == a["requests_tracked"] == 0 and a["accepted"] == a["ended"] for a in accounts) \
                and _metrics(base).get("tandem_router_requests_in_flight", 0.0) == 0:
            return round(time.monotonic() - started, 2)
        time.sleep(0.5)
    return None


def add_soak_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--served-model-name", default="demo")
    p.add_argument("--port", type=int, default=8610)
    p.add_argument("--duration-s", type=float, default=1800.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kill-at-s", type=float, default=None, help="default: half-way")
    p.add_argument("--warmup-s", type=float, default=300.0)
    p.add_argument("--window-s", type=float, default=300.0, help="memory: median of the first and last window")
    p.add_argument("--sample-every-s", type=float, default=10.0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="file for the fleet's output")
    p.add_argument("--output-json", default=None, help="default: benchmarks/results/soak-<date>.json")
    return p


def soak_command(args: argparse.Namespace) -> int:
    """``tandem bench soak``: run the soak, write its report, print the headline fields."""
    if args.kill_at_s is None:
        args.kill_at_s = args.duration_s / 2
    report = run_soak(args)
    out = Path(args.output_json or f"benchmarks/results/soak-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests_sent", "outcomes", "failed_outside_kill_window",
                                             "worker_accounts_at_end", "kill",
                                             "memory", "idle_after_s", "router_in_flight_at_end") if k in report},
                     indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return soak_command(add_soak_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
