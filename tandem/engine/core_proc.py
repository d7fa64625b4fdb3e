"""The engine core in its own process: a busy loop of receive -> schedule -> execute -> send.

Two ZMQ sockets over ipc:// in a private (0700) directory: PULL for inputs from the API process,
PUSH for outputs. Messages are msgspec (tandem/engine/protocol.py) with a shared secret frame;
anything else is dropped and logged. The loop blocks on the input socket only when idle.

NOTE (parent invariant): the core never outlives its API process, however that died. On Linux the
kernel kills it (PR_SET_PDEATHSIG, SIGKILL: it works even inside a long step). Portably, the loop
checks the parent at least once a second, busy or idle, and no send blocks for longer than that
(a PUSH whose reader is gone blocks once its queue is full); a watchdog thread hard-exits the
process if the orderly exit has not finished EXIT_GRACE_S after the parent was found gone, and
the cleanup on the way out is bounded the same way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq

from tandem.config import EngineConfig
from tandem.engine.core import CoreOutput, EngineCore
from tandem.engine.kv_publisher import KVEventPublisher
from tandem.engine.protocol import (
    MAX_MESSAGE_BYTES,
    Codec,
    CoreFailed,
    CoreInput,
    CoreMessage,
    EngineCoreRequest,
    EngineStats,
    FinishRequests,
    Ready,
    Shutdown,
    StepOutputs,
)
from tandem.engine.request import RequestStatus
from tandem.kv_transfer.stats import TransferStats
from tandem.lifecycle import set_parent_death_signal

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 200
_TRANSFER_POLL_MS = 2
PARENT_CHECK_S = 1.0  # the loop, its blocking sends and the watchdog look at the parent this often
EXIT_GRACE_S = 5.0  # cleanup on the way out (threads, sockets, contexts) may take this long, no more


class ParentGone(Exception):
    """The API process that started this core is gone: nobody will read what it sends."""


class ParentWatch:
    """``os.getppid()`` changes when the parent dies (the orphan is re-parented), whatever killed it."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self._next_check = 0.0

    def gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def check(self) -> None:
        """Raise ParentGone if the parent is gone; looks at most once per PARENT_CHECK_S."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + PARENT_CHECK_S
        if self.gone():
            raise ParentGone(f"API process {self.parent_pid} is gone")


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), then exit at once if
    the parent died before that was set. The signal follows the parent *thread* that started us:
    AsyncLLM.start runs on the server's event-loop thread, which lives as long as the server.
    Elsewhere the loop's checks and the watchdog (start_watchdog) do the same, a little later."""
    if not set_parent_death_signal(signal.SIGKILL) and sys.platform.startswith("linux"):
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: the loop's checks and the watchdog stand in")
    if os.getppid() != parent_pid:
        os._exit(1)


def start_watchdog(watch: ParentWatch) -> None:
    """Daemon thread: once the parent is gone, give the orderly exit EXIT_GRACE_S, then end the
    process whatever the main thread is doing (a step that does not return, a hung cleanup)."""

    def _watch() -> None:
        while not watch.gone():
            time.sleep(PARENT_CHECK_S)
        time.sleep(EXIT_GRACE_S)
        logger.error("API process %d is gone and the core has not exited; exiting now", watch.parent_pid)
        os._exit(1)

    threading.Thread(target=_watch, name="parent-watchdog", daemon=True).start()


def send(sock: zmq.Socket, frames: list[bytes], watch: ParentWatch) -> None:
    """Blocking send that cannot outlive the parent: a PUSH blocks once its queue is full, and
    it stays full for ever when the reader died. Raises ParentGone instead."""
    while not sock.poll(int(PARENT_CHECK_S * 1000), zmq.POLLOUT):
        watch.check()
    sock.send_multipart(frames)


def _bounded(cleanup, timeout_s: float) -> bool:
    """Run ``cleanup`` in a daemon thread; False if it did not finish in time (left behind)."""
    thread = threading.Thread(target=cleanup, name="core-cleanup", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


@dataclass
class CoreAddresses:
    inputs: str  # API process PUSH -> core PULL
    outputs: str  # core PUSH -> API process PULL
    kv_events: str | None = None  # PUB of KV event batches for routers (tandem/engine/kv_publisher.py)
    kv_events_replay: str | None = None  # ROUTER answering replay requests
    kv_events_secret: bytes | None = None


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, secret: bytes, parent_pid: int) -> None:
    """Process entry point (multiprocessing spawn target)."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s engine-core %(levelname)s %(message)s")
    watch = ParentWatch(parent_pid)
    start_watchdog(watch)
    ctx = zmq.Context()
    inputs, outputs = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (inputs, outputs):
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 1000)
    inputs.connect(addresses.inputs)
    outputs.connect(addresses.outputs)
    out_codec = Codec(secret, CoreMessage)
    publisher = None
    core = None
    parent_gone = False

    def _cleanup() -> None:
        if core is not None:
            core.close()
        inputs.close(0)
        outputs.close(0 if parent_gone else None)  # nobody reads any more: do not linger
        if publisher is not None:
            publisher.close()
        ctx.term()

    try:
        try:
            if addresses.kv_events:
                publisher = KVEventPublisher(ctx, addresses.kv_events, addresses.kv_events_replay,
                                             addresses.kv_events_secret)
            core = EngineCore(config, kv_event_sink=publisher.publish if publisher else None)
        except Exception as e:
            logger.exception("engine core failed to start")
            send(outputs, out_codec.encode(CoreFailed(f"{type(e).__name__}: {e}")), watch)
            return
        send(outputs, out_codec.encode(Ready(core.max_model_len, core.vocab_size, core.runner.num_blocks,
                                             config.cache.block_size, json.dumps(core.hf_config))), watch)
        try:
            _busy_loop(core, inputs, outputs, Codec(secret, CoreInput), out_codec, watch, publisher)
        except ParentGone:
            raise
        except Exception as e:
            logger.exception("engine core died")
            send(outputs, out_codec.encode(CoreFailed(f"{type(e).__name__}: {e}")), watch)
            raise
    except ParentGone as e:
        parent_gone = True
        logger.error("%s; engine core exits", e)
    finally:
        if not _bounded(_cleanup, EXIT_GRACE_S):
            logger.error("engine core cleanup did not finish in %.0f s; exiting anyway", EXIT_GRACE_S)
            os._exit(1)
    if parent_gone:  # skip multiprocessing's exit handling too: nothing is waiting for this process
        logging.shutdown()
        os._exit(0)


def _busy_loop(core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, in_codec: Codec, out_codec: Codec,
               watch: ParentWatch, publisher: KVEventPublisher | None) -> None:
    """Until Shutdown; ParentGone (raised by ``watch`` on any iteration, busy or idle, or by a
    send that cannot complete) when the API process died."""
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    if publisher is not None and publisher.replay is not None:
        poller.register(publisher.replay, zmq.POLLIN)
    last_transfers = _transfer_state(core)
    refused: list[CoreOutput] = []  # requests add_request refused: reported as failed with the next step
    while True:
        watch.check()  # every iteration; the check itself is rate-limited
        # Spin while there is compute to do; poll briefly while only KV transfers or leases are
        # pending (their threads need the CPU, and leases must be freed on time); else block.
        timeout = 0 if core.has_runnable_requests() else \
            _TRANSFER_POLL_MS if core.has_unfinished_requests() or core.has_pending_transfers() else _IDLE_POLL_MS
        handled = False
        while events := dict(poller.poll(timeout)):
            if publisher is not None:
                publisher.serve_replays()
            if inputs in events:
                if not _handle(core, inputs.recv_multipart(), in_codec, refused):
                    return
                handled = True
            timeout = 0
        if core.has_unfinished_requests() or core.has_pending_transfers() or refused:
            runnable = core.has_runnable_requests()
            outs = refused + core.step()
            refused = []
            transfers = _transfer_state(core)
            if outs or runnable or handled or transfers != last_transfers:
                send(outputs, out_codec.encode(StepOutputs(outs, stats(core))), watch)
            last_transfers = transfers
        elif handled:  # e.g. the last request was aborted: report the idle state
            send(outputs, out_codec.encode(StepOutputs([], stats(core))), watch)


def _handle(core: EngineCore, frames: list[bytes], codec: Codec, refused: list[CoreOutput]) -> bool:
    """Apply one input message; False on Shutdown. Bad messages are logged and dropped."""
    try:
        msg = codec.decode(frames)
    except (PermissionError, msgspec.DecodeError, msgspec.ValidationError) as e:
        logger.warning("dropped a bad message: %s", e)
        return True
    if isinstance(msg, EngineCoreRequest):
        try:
            core.add_request(msg)
        except ValueError as e:  # the API process checks first; a request it let through fails alone
            logger.warning("refused request %s: %s", msg.request_id, e)
            refused.append(CoreOutput(msg.request_id, [], finish_reason="error", error=str(e)))
    elif isinstance(msg, FinishRequests):
        status = RequestStatus.FINISHED_STOPPED if msg.status == "stop" else RequestStatus.FINISHED_ABORTED
        core.finish_requests(msg.request_ids, status, msg.stop_reason)
    elif isinstance(msg, Shutdown):
        return False
    return True


def _transfer_state(core: EngineCore) -> tuple:
    """Changes when leases end or loads finish, so idle-time changes still reach /metrics."""
    return core.scheduler.transfer_state() + (core.kv.pool.num_free_blocks,)


def stats(core: EngineCore) -> EngineStats:
    sched, kv = core.scheduler, core.kv
    return EngineStats(num_running=len(sched.running), num_waiting=len(sched.waiting) + sched.num_loading,
                       kv_cache_usage=kv.usage, prefix_cache_queries=kv.stats.queries,
                       prefix_cache_hits=kv.stats.hits, num_preemptions=sched.num_preemptions,
                       transfer=_transfer_stats(core), new_step_tokens=core.take_step_tokens(),
                       offload=core.connector.offload_report() if core.connector is not None else None,
                       expert_imbalance=core.expert_load_imbalance(),
                       spec_decode=sched.planner.stats if sched.planner is not None else None)


def _transfer_stats(core: EngineCore) -> TransferStats | None:
    return core.connector.report() if core.connector is not None else None

