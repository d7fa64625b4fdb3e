"""KV transfer time vs one decode step of the same request, engine cores in one process, for each
transport: ZMQ TCP on 127.0.0.1 (between hosts) and shared memory (`tandem up` on one host).

    python scripts/bench_kv_transfer.py MODEL_DIR [--lengths 128 1000 2000] [--transports tcp shm]

Writes benchmarks/results/kv-transfer-vs-decode-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench.throughput import describe_device, model_shape
from tandem.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request
from tandem.kv_transfer.ticket import KVTransferConfig, parse_ticket
from tandem.sampling_params import SamplingParams

SECRET = b"bench-secret-0123456789abcdef"


def core(model: str, role: str, transport: str = "auto") -> EngineCore:
    cfg = EngineConfig(ModelConfig(model), CacheConfig(kv_cache_memory="1GiB", enable_prefix_caching=False),
                       SchedulerConfig(max_num_batched_tokens=4096),
                       KVTransferConfig(role=role, secret=SECRET, lease_s=30, transport=transport))
    return EngineCore(cfg)


def run_until_finished(cores, rid: str) -> list:
    outs = []
    while not (outs and outs[-1].finish_reason):
        for c in cores:
            if c.has_unfinished_requests() or c.has_pending_transfers():
                outs += [o for o in c.step() if o.request_id == rid]
    return outs


def measure(prefill: EngineCore, decode: EngineCore, length: int, rep: int, steps: int) -> dict:
    prompt = [(i * 7919 + rep * 31 + length) % 8000 + 10 for i in range(length)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rid = f"p{length}-{rep}"
    prefill.add_request(Request(rid, prompt, params, max_tokens=1, do_remote_decode=True))
    ticket = parse_ticket(run_until_finished([prefill], rid)[-1].kv_transfer_params, SECRET, prompt)
    before = decode.connector.stats.seconds_total
    dec = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    decode.add_request(Request(f"d{rid}", prompt, dec, max_tokens=steps + 1, remote_ticket=ticket))
    while decode.scheduler.loading or not decode.scheduler.running:  # until the load is in and admitted
        prefill.step()
        decode.step()
        time.sleep(0.002)  # as the server's core loop polls while only transfers are pending
    transfer_s = decode.connector.stats.seconds_total - before
    step_times = []
    while decode.has_unfinished_requests():
        t0 = time.perf_counter()
        decode.step()
        step_times.append(time.perf_counter() - t0)
    while prefill.has_pending_transfers():
        prefill.step()
    return {"transfer_s": transfer_s, "decode_step_s": statistics.median(step_times[1:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000, 2000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--transports", nargs="+", choices=("tcp", "shm"), default=["tcp", "shm"])
    args = ap.parse_args()
    prefill = core(args.model, "prefill")  # transport auto: its cache is in shared memory
    decodes = {t: core(args.model, "decode", "auto" if t == "shm" else "tcp") for t in args.transports}
    for decode in decodes.values():  # warm-up: first allocations, first mapping of the region
        measure(prefill, decode, 64, -1, 2)
    rows = []
    for length in args.lengths:
        for transport, decode in decodes.items():  # interleaved, so both see the same machine state
            shm_before = decode.connector.stats.loads_shm
            runs = [measure(prefill, decode, length, r, args.steps) for r in range(args.reps)]
            assert (decode.connector.stats.loads_shm > shm_before) == (transport == "shm")
            t = statistics.median(r["transfer_s"] for r in runs)
            s = statistics.median(r["decode_step_s"] for r in runs)
            nbytes = (length - 1 + 15) // 16 * decode.runner.kv_bytes_per_block
            rows.append({"transport": transport, "prompt_tokens": length, "kv_bytes": nbytes,
                         "transfer_ms": t * 1e3, "decode_step_ms_batch1": s * 1e3, "transfer_over_step": t / s,
                         "effective_gb_per_s": nbytes / t / 1e9})
            print(rows[-1])
    for c in (prefill, *decodes.values()):
        c.close()
    out = {"benchmark": "KV transfer vs one decode step of the same request", "date": datetime.now(UTC).isoformat(),
           "device": describe_device("cpu"), "model": model_shape(args.model), "transports": {"tcp": "ZMQ TCP 127.0.0.1, msgspec headers + raw frames",
                                                             "shm": "memfd region mapped read-only, one copy"},
           "flags": {"block_size": 16, "dtype": "float32", "reps": args.reps}, "rows": rows}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path("benchmarks/results") / f"kv-transfer-vs-decode-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
