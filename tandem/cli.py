"""Command line: ``tandem generate``, ``tandem bench throughput``, ``tandem eval perplexity|quality``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tandem.config import KV_FAILURE_POLICIES, KV_ROLES, KV_TRANSPORTS
from tandem.entrypoints.http_protocol import add_timeout_args
from tandem.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from tandem.engine.arg_utils import EngineArgs


def _cmd_generate(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams
    from tandem.engine.arg_utils import EngineArgs

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, ignore_eos=args.ignore_eos,
                            stop=args.stop or None)
    prompts = args.prompt or [sys.stdin.read()]
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        if len(prompts) > 1:
            print(f"--- {prompt!r}")
        print(prompt + out.outputs[0].text if args.echo else out.outputs[0].text)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os
    from pathlib import Path

    from tandem.engine.arg_utils import EngineArgs
    from tandem.entrypoints.http_protocol import HTTPTimeouts
    from tandem.entrypoints.openai.api_server import serve

    secret = os.environ.get("TANDEM_KV_EVENTS_SECRET")
    if (args.kv_events_endpoint or args.kv_events_replay_endpoint) and not secret:
        # the events carry the token ids of cached prompt blocks: never publish them unsigned
        raise ValueError("--kv-events-endpoint/--kv-events-replay-endpoint need $TANDEM_KV_EVENTS_SECRET (the "
                         "batches are HMAC-signed with it; the router verifies them with the same value)")
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = EngineArgs.from_cli_args(args).create_engine_config()
    config.kv_transfer = _kv_transfer_config(args)
    if config.kv_transfer is not None and config.scheduler.async_scheduling:
        raise ValueError("--async-scheduling does not combine with disaggregated serving (--role prefill|decode, "
                         "or role both with $TANDEM_KV_TRANSFER_SECRET set)")
    # as vLLM: the model argument as given (clients send that string); the bundled demo by its name
    names = args.served_model_name or [args.model if args.model else Path(config.model.model).name]
    api_key = args.api_key or os.environ.get("TANDEM_API_KEY")
    kv_events = {"kv_events_endpoint": args.kv_events_endpoint,
                 "kv_events_replay_endpoint": args.kv_events_replay_endpoint,
                 "kv_events_secret": secret.encode() if secret else None}
    return asyncio.run(serve(config, args.host, args.port, names, api_key, args.max_queued_requests, kv_events,
                             timeouts=HTTPTimeouts.from_args(args),
                             tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                             tool_call_parser=_tool_call_parser(args)))


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    """The parser of tool_choice "auto"; None: auto is refused (vLLM's two flags, both needed)."""
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def _kv_transfer_config(args: argparse.Namespace):
    """Disaggregation is on for --role prefill|decode, or for role both with a secret set."""
    import os

    from tandem.config import KVTransferConfig

    secret = os.environ.get("TANDEM_KV_TRANSFER_SECRET", "")
    if args.role == "both" and not secret:
        return None
    if not secret:
        raise ValueError(f"--role {args.role} needs $TANDEM_KV_TRANSFER_SECRET (the same on every worker)")
    return KVTransferConfig(role=args.role, host=args.kv_transfer_host, port=args.kv_transfer_port,
                            secret=secret.encode(), lease_s=args.kv_lease_s, max_hold_s=args.kv_lease_max_s,
                            transfer_timeout_s=args.kv_transfer_timeout_s, failure_policy=args.kv_failure_policy,
                            transport=args.kv_transport)


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from tandem.bench.throughput import run_throughput

    run_throughput(args)
    return 0


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from tandem.bench.latency import run_latency

    run_latency(args)
    return 0


def _cmd_bench_offload(args: argparse.Namespace) -> int:
    from tandem.bench.offload import run_offload

    run_offload(args)
    return 0


def _cmd_bench_spec(args: argparse.Namespace) -> int:
    from tandem.bench.spec import run_spec

    run_spec(args)
    return 0


def _cmd_bench_compare(args: argparse.Namespace) -> int:
    from tandem.bench.compare import run_compare

    run_compare(args)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from tandem.bench.serve import run_serve

    result = run_serve(args)
    runs = result.get("sweep", [result])
    return 0 if all(r["completed"] > 0 for r in runs) else 1


def _cmd_router(args: argparse.Namespace) -> int:
    from tandem.router.launch import run_router

    return run_router(args)


def _cmd_up(args: argparse.Namespace) -> int:
    from tandem.router.launch import run_up

    check_worker_args(args.model or "MODEL", args.worker_args)
    return run_up(args)


def check_worker_args(model: str, worker_args: str) -> EngineArgs:
    """``tandem up --worker-args``, read as ``tandem serve`` would read it, before any worker
    starts: an unknown flag exits 2 with serve's usage, a bad value is a ValueError naming it."""
    import shlex

    from tandem.engine.arg_utils import EngineArgs

    return EngineArgs.from_cli_args(build_parser().parse_args(["serve", model, *shlex.split(worker_args)]))


def _cmd_eval_quality(args: argparse.Namespace) -> int:
    from tandem.eval.quality import run_quality

    return run_quality(args)


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from tandem.eval.perplexity import run_perplexity

    run_perplexity(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tandem.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser(prog="tandem", description="LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline and print the text")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable); default: stdin")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    EngineArgs.add_cli_args(gen, model="positional")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model ids clients may use; responses report the first (default: the model argument "
                          "as given)")
    srv.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                     help="serve GET /tokenizer_info (the tokenizer's config and chat template), as vLLM's flag; "
                          "lm-eval's remote tokenizer reads it")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='serve tool_choice "auto" (the default when a request has tools), reading calls from '
                          "the output with --tool-call-parser; required and named choices need neither flag")
    srv.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                     help="the model's tool-call format: hermes (<tool_call>{...}</tool_call>, Qwen and Hermes), "
                          "llama3_json (Llama 3.x JSON calls), mistral ([TOOL_CALLS][...])")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $TANDEM_API_KEY)")
    srv.add_argument("--max-queued-requests", type=int, default=None,
                     help="beyond max-num-seqs running plus this many queued, answer 503 with Retry-After")
    srv.add_argument("--kv-events-endpoint", default=None,
                     help="publish KV cache events (ZMQ PUB), e.g. tcp://127.0.0.1:5557; they carry the token "
                          "ids of cached prompt blocks; HMAC-signed with $TANDEM_KV_EVENTS_SECRET (required)")
    srv.add_argument("--kv-events-replay-endpoint", default=None,
                     help="ZMQ ROUTER answering replay requests for missed KV event batches")
    add_timeout_args(srv)
    dis = srv.add_argument_group("disaggregated prefill/decode (secret: $TANDEM_KV_TRANSFER_SECRET)")
    dis.add_argument("--role", choices=KV_ROLES, default="both",
                     help="prefill: lease finished prompts' KV to decode workers; decode: load it from them; "
                          "both (default): either, when a secret is set, else plain serving")
    dis.add_argument("--kv-transfer-host", default="127.0.0.1",
                     help="address the KV sender binds and advertises to decode workers")
    dis.add_argument("--kv-transfer-port", type=int, default=0, help="KV sender port (0: any free port)")
    dis.add_argument("--kv-lease-s", type=float, default=10.0,
                     help="a leased prefill's blocks are freed this long after the last heartbeat")
    dis.add_argument("--kv-lease-max-s", type=float, default=120.0,
                     help="heartbeats stop extending a lease this long after it was issued (a decode worker "
                          "that has not pulled by then gets lease_expired)")
    dis.add_argument("--kv-transfer-timeout-s", type=float, default=10.0,
                     help="a KV load with no data for this long fails (kind timeout)")
    dis.add_argument("--kv-failure-policy", choices=KV_FAILURE_POLICIES, default="fail",
                     help="a failed KV load: fail the request (HTTP 502) or prefill it locally")
    dis.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                     help="auto (default): workers on one host copy KV through shared memory, others "
                          "over TCP; tcp: always TCP")
    EngineArgs.add_cli_args(srv, model="positional")
    srv.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    from tandem.bench.compare import add_compare_args
    from tandem.bench.latency import add_latency_args
    from tandem.bench.offload import add_offload_args
    from tandem.bench.serve import add_serve_args
    from tandem.bench.soak import add_soak_args, soak_command
    from tandem.bench.spec import add_spec_args
    from tandem.bench.throughput import add_throughput_args

    benches = (
        ("throughput", add_throughput_args, _cmd_bench_throughput, "offline throughput, as `vllm bench throughput`"),
        ("latency", add_latency_args, _cmd_bench_latency, "offline latency of one fixed batch, as `vllm bench "
         "latency`, with decode step time and achieved weight bandwidth"),
        ("serve", add_serve_args, _cmd_bench_serve, "online serving benchmark against any OpenAI-compatible "
         "server, as `vllm bench serve`"),
        ("offload", add_offload_args, _cmd_bench_offload, "what the KV offload tiers save on revisited prefixes, "
         "and cost without reuse, side by side with offloading off"),
        ("spec", add_spec_args, _cmd_bench_spec, "speculative decoding (every proposal verified, and adaptive) "
         "side by side with none, at batch 1 and a full batch, on code and copy-heavy edits"),
        ("compare", add_compare_args, _cmd_bench_compare, "result JSON files side by side, with ratios to the first"),
        ("soak", add_soak_args, soak_command, "a fleet under steady load for a long time, a worker killed "
         "half-way: leaks, stuck requests and memory growth"),
    )
    for name, add_args, func, help_text in benches:
        add_args(bench.add_parser(name, help=help_text)).set_defaults(func=func)

    from tandem.router.launch import add_router_args, add_up_args

    rtr = sub.add_parser("router", help="OpenAI-compatible router over tandem (or vLLM) workers, by cache and load")
    add_router_args(rtr)
    rtr.set_defaults(func=_cmd_router)
    up = sub.add_parser("up", help="start N local `tandem serve` workers and the router in front of them")
    add_up_args(up)
    up.set_defaults(func=_cmd_up)

    evaluate = sub.add_parser("eval", help="model evaluations").add_subparsers(dest="eval_command", required=True)
    from tandem.eval.perplexity import add_perplexity_args

    ppl = evaluate.add_parser("perplexity", help="per-token perplexity of text files, from prompt logprobs")
    add_perplexity_args(ppl)
    ppl.set_defaults(func=_cmd_eval_perplexity)
    from tandem.eval.quality import add_quality_args

    quality = evaluate.add_parser("quality", help="quality of a precision choice (quantization, policy, KV cache "
                                                  "dtype) against the unquantized model; exits 1 past thresholds")
    add_quality_args(quality)
    quality.set_defaults(func=_cmd_eval_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
