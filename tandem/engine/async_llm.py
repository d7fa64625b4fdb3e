"""AsyncLLM: the API process's side of the engine. Tokenizes and validates (InputProcessor),
detokenizes and aggregates (OutputProcessor) in this process, while the EngineCore runs in a
child process behind ZMQ; the EngineCoreRequest/EngineCoreOutput structs cross as they are.

One asyncio task reads the core's StepOutputs, turns them into RequestOutputs and puts each into
its request's queue. If the core process dies, every pending request gets EngineDeadError and
``errored`` turns true (the server's /health reports 503 and it exits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import secrets
import tempfile
import time

import zmq
import zmq.asyncio

from tandem.config import EngineConfig
from tandem.engine.core_proc import CoreAddresses, run_engine_core
from tandem.engine.llm_engine import PromptType, add_request, make_processors
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
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class _CoreClient:
    """CoreHandle over ZMQ: what the OutputProcessor calls to add and finish requests."""

    def __init__(self, socket: zmq.Socket, codec: Codec) -> None:
        self.socket, self.codec = socket, codec

    def _send(self, msg) -> None:
        self.socket.send_multipart(self.codec.encode(msg), copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        stop_reason: int | str | None = None) -> None:
        stop = status == RequestStatus.FINISHED_STOPPED
        self._send(FinishRequests(list(request_ids), "stop" if stop else "abort",
                                  str(stop_reason) if stop_reason is not None else None))

    def shutdown(self) -> None:
        self._send(Shutdown())


class RequestStream:
    """One request's outputs, as an async iterator. NOTE: the request counts as in flight from
    generate() until the stream ends or is closed; ``aclose()`` works whether or not the stream
    was ever read, so a response that is never sent cannot leak its request."""

    def __init__(self, engine: AsyncLLM, request_id: str, num_sequences: int) -> None:
        self.engine, self.request_id, self.num_sequences = engine, request_id, num_sequences
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.closed:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._close("aborted")
            raise
        if isinstance(item, BaseException):
            self._close("failed")
            raise item
        if item.finished:
            self._close("failed" if item.error is not None else "finished")
        return item

    async def aclose(self) -> None:
        self._close("aborted")

    def _close(self, outcome: str) -> None:
        if not self.closed:
            self.closed = True
            self.engine._close_stream(self, outcome)


class AsyncLLM:
    def __init__(self, config: EngineConfig, *, kv_events_endpoint: str | None = None,
                 kv_events_replay_endpoint: str | None = None, kv_events_secret: bytes | None = None) -> None:
        self.config = config
        self._kv_events = (kv_events_endpoint, kv_events_replay_endpoint, kv_events_secret)
        self.errored: str | None = None
        self.stats: EngineStats | None = None
        self.transfer_durations: list[float] = []  # KV loads not yet observed by the metrics
        self.expert_imbalance: list[float] = []  # MoE load imbalance samples not yet observed
        self.step_tokens: list[int] = []  # tokens of each core step not yet observed by the metrics
        self._queues: dict[str, asyncio.Queue] = {}
        self._num_sequences = 0
        self.requests_accepted = 0  # == sum(requests_ended.values()) whenever nothing is in flight
        self.requests_ended = {"finished": 0, "aborted": 0, "failed": 0}
        self._reader: asyncio.Task | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, ready_timeout_s: float = 600.0) -> None:
        secret = secrets.token_bytes(32)
        self._sock_dir = tempfile.mkdtemp(prefix="tandem-")  # 0700: only this user reaches the sockets
        addresses = CoreAddresses(f"ipc://{self._sock_dir}/in", f"ipc://{self._sock_dir}/out", *self._kv_events)
        self._ctx = zmq.asyncio.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._out = self._ctx.socket(zmq.PULL)
        for sock in (self._in, self._out):
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
        self._in.bind(addresses.inputs)
        self._out.bind(addresses.outputs)
        self._out_codec = Codec(secret, CoreMessage)
        spawn = multiprocessing.get_context("spawn")
        self._proc = spawn.Process(target=run_engine_core, name="tandem-engine-core", daemon=True,
                                   args=(self.config, addresses, secret, os.getpid()))
        self._proc.start()
        ready = await self._wait_ready(ready_timeout_s)
        self.max_model_len, self.vocab_size = ready.max_model_len, ready.vocab_size
        self.num_blocks, self.block_size = ready.num_blocks, ready.block_size
        client = _CoreClient(self._in, Codec(secret, CoreInput))
        self._client = client
        mc = self.config.model
        self.input_processor, self.output_processor = make_processors(
            client, mc.model, mc.tokenizer, json.loads(ready.hf_config_json), ready.vocab_size, ready.max_model_len)
        self.tokenizer = self.input_processor.tokenizer
        self._reader = asyncio.create_task(self._read_outputs())

    async def _wait_ready(self, timeout_s: float) -> Ready:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self._out.poll(500):
                msg = self._out_codec.decode(await self._out.recv_multipart())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, CoreFailed):
                    raise RuntimeError(f"engine core failed to start: {msg.error}")
            elif not self._core_process.is_alive():
                raise RuntimeError(f"engine core exited during start-up (exit code {self._core_process.exitcode})")
        raise TimeoutError(f"engine core not ready after {timeout_s:.0f}s")

    @property
    def _core_process(self) -> multiprocessing.process.BaseProcess:
        assert self._proc is not None, "the engine core process is started before anything waits on it"
        return self._proc

    async def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._proc is not None and self._proc.is_alive():
            try:
                self._client.shutdown()
            except (zmq.ZMQError, AttributeError):
                pass
            await asyncio.to_thread(self._proc.join, 5)
            if self._proc.is_alive():
                self._proc.kill()
        self._in.close(0)
        self._out.close(0)
        self._ctx.term()

    # -- requests -----------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Sequences in flight (a request with n = 4 counts 4): what admission control bounds."""
        return self._num_sequences

    def generate(self, prompt: PromptType, params: SamplingParams, request_id: str, *,
                 priority: int = 0, remote_ticket=None, do_remote_decode: bool | str = False) -> RequestStream:
        """Add the request now (a bad one raises here, before any output) and return its stream of
        cumulative RequestOutputs up to the finished one. Closing the stream early (client gone,
        task cancelled), even before reading from it, aborts the request in the core."""
        if self.errored:
            raise EngineDeadError(self.errored)
        add_request(self.input_processor, self.output_processor, request_id, prompt, params, priority=priority,
                    remote_ticket=remote_ticket, do_remote_decode=do_remote_decode)
        stream = RequestStream(self, request_id, params.n)
        self._queues[request_id] = stream.queue
        self._num_sequences += params.n
        self.requests_accepted += 1
        return stream

    @property
    def num_tracked_requests(self) -> int:
        return self.output_processor.num_requests if hasattr(self, "output_processor") else 0

    def _close_stream(self, stream: RequestStream, outcome: str) -> None:
        """NOTE: every accepted request ends here exactly once: finished, aborted or failed."""
        if self._queues.pop(stream.request_id, None) is not None:
            self._num_sequences -= stream.num_sequences
        self.requests_ended[outcome] += 1
        if outcome == "aborted" and not self.errored:
            self.output_processor.abort_request(stream.request_id)

    def abort(self, request_id: str) -> None:
        self.output_processor.abort_request(request_id)

    async def _read_outputs(self) -> None:
        try:
            while True:
                if not await self._out.poll(1000):
                    if not self._core_process.is_alive():
                        raise EngineDeadError(f"engine core process exited (exit code {self._core_process.exitcode})")
                    continue
                try:
                    msg = self._out_codec.decode(await self._out.recv_multipart())
                except PermissionError as e:
                    logger.warning("dropped a message from the core socket: %s", e)
                    continue
                if isinstance(msg, CoreFailed):
                    raise EngineDeadError(f"engine core failed: {msg.error}")
                if isinstance(msg, StepOutputs):
                    self.stats = msg.stats
                    self.step_tokens.extend(msg.stats.new_step_tokens)
                    del self.step_tokens[:-10_000]  # unscraped: keep the newest only
                    self.expert_imbalance.extend(msg.stats.expert_imbalance)
                    del self.expert_imbalance[:-10_000]  # unscraped: keep the newest only
                    if msg.stats.transfer is not None:
                        self.transfer_durations.extend(msg.stats.transfer.new_durations)
                        del self.transfer_durations[:-10_000]  # unscraped: keep the newest only
                    self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - whatever killed the reader kills every request
            self.errored = str(e) or type(e).__name__
            logger.error("engine is dead: %s", self.errored)
            for queue in list(self._queues.values()):
                queue.put_nowait(EngineDeadError(self.errored))

    def _dispatch(self, msg: StepOutputs) -> None:
        for out in self.output_processor.process_outputs(msg.outputs):
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
