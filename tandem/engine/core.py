"""EngineCore: scheduler + KV cache manager + model runner, with no tokenizer.

It speaks token ids only: requests come in with their prompt ids and sampling parameters, each
``step()`` returns, per request that advanced, the new token ids, raw logprobs and, once, why it
finished. Text (tokenization, incremental detokenization, stop strings) is the caller's job: the
offline ``LLMEngine`` does it in-process; the server does it in the API process while the core
runs in its own process.
NOTE: every request added ends exactly once (a CoreOutput with finish_reason set, or an abort the
caller asked for); its blocks are free from that moment.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.config import EngineConfig, ModelConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.kv_events import BlockRemoved, BlockStored, KVEvent, KVEventBatch
from tandem.engine.protocol import EngineCoreOutput, EngineCoreRequest
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler
from tandem.kv_transfer.base import TierChange
from tandem.model.moe import load_imbalance
from tandem.profiling import span
from tandem.runner.model_runner import ModelRunner, RunnerOutput, StepHandle
from tandem.scheduler_output import SchedulerOutput

if TYPE_CHECKING:
    import torch

    from tandem.engine.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


# What a step returns per request: the same struct in-process and on the wire (tandem/engine/protocol.py).
CoreOutput = EngineCoreOutput


# Without a sink, the newest batches are kept for take_kv_events(); older ones are dropped.
KV_EVENT_BACKLOG = 1024


class EngineCore:
    def __init__(self, config: EngineConfig, *, kv_event_sink: Callable[[KVEventBatch], None] | None = None) -> None:
        self.config = config
        kv = config.kv_transfer
        if config.scheduler.async_scheduling and kv is not None:
            raise ValueError("async scheduling does not combine with disaggregated prefill/decode yet")
        if config.speculative is not None and kv is not None:
            raise ValueError("speculative_config does not combine with disaggregated prefill/decode yet")
        self.runner = ModelRunner(config.model, config.cache,
                                  share_kv_cache=kv is not None and kv.sends and kv.transport == "auto",
                                  scheduler_config=config.scheduler, speculative_config=config.speculative)
        self.hf_config = self.runner.hf_config
        self.vocab_size = self.runner.args.vocab_size
        self.max_model_len = self._resolve_max_model_len(config.model.max_model_len)
        drafter = self.runner.drafter
        if drafter is not None and drafter.max_position_embeddings and drafter.max_position_embeddings < self.max_model_len:
            raise ValueError(f"the draft model (or EAGLE head) holds {drafter.max_position_embeddings} positions, fewer than "
                             f"max_model_len {self.max_model_len}; lower max_model_len")
        self.runner.setup_decode_graphs(self.max_model_len, config.scheduler.max_num_seqs)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching)
        self.connector = self._make_connector(config)
        self.async_scheduling = config.scheduler.async_scheduling
        # async scheduling: the launched step whose output is applied during the next step() call
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.connector, config.speculative)
        self.kv_event_sink = kv_event_sink
        self._kv_event_seq = 0
        self._kv_event_backlog: deque[KVEventBatch] = deque(maxlen=KV_EVENT_BACKLOG)
        # tokens of each step not yet reported (vllm:iteration_tokens_total); the newest only if unread
        self._step_tokens: deque[int] = deque(maxlen=10_000)
        self._structured: StructuredOutputManager | None = None  # made by the first structured request
        self._experts_read_at = float("-inf")
        self._last_emitted = 0  # output tokens the latest applied step gave (speculation's measurement)
        # a draft model's seconds in the latest applied step, and in the one before (whose drafts it verified)
        self._draft_seconds = (0.0, 0.0)

    def _resolve_max_model_len(self, requested: int | None) -> int:
        limit = int(self.hf_config.get("max_position_embeddings", 4096))
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} positions")
        # NOTE: one request must always fit in the whole cache, or preemption could never make room.
        capacity = self.runner.num_blocks * self.config.cache.block_size
        if requested is not None and requested > capacity:
            raise ValueError(f"max_model_len {requested} does not fit in the KV cache ({capacity} tokens); "
                             f"raise kv_cache_memory or lower max_model_len")
        if requested is None and limit > capacity:
            logger.warning("max_model_len %d capped to the KV cache capacity of %d tokens", limit, capacity)
            limit = capacity
        return requested or limit

    def _make_connector(self, config: EngineConfig):
        if config.kv_offload is not None and config.kv_transfer is not None:
            from tandem.kv_offload.multi import MultiConnector

            return MultiConnector(self._make_pd_connector(config), self._make_offloading_connector(config))
        if config.kv_offload is not None:
            return self._make_offloading_connector(config)
        if config.kv_transfer is None:
            return None
        return self._make_pd_connector(config)

    def _make_pd_connector(self, config: EngineConfig):
        assert config.kv_transfer is not None
        from tandem.kv_transfer.connector import KVConnector

        if config.cache.calculate_kv_scales and self.runner.kv_spec.quantized_layers:
            raise ValueError("calculate_kv_scales cannot be used with KV transfer: each worker would calibrate "
                             "its own scales and read the other's FP8 blocks wrongly; use a checkpoint with "
                             "k_scale/v_scale (or the default 1.0)")
        runner = self.runner
        return KVConnector(config.kv_transfer, self._kv_caches(), self._kv_compat(), config.cache.block_size,
                           runner.kv_bytes_per_block // config.cache.block_size, runner.kv_region)

    def _make_offloading_connector(self, config: EngineConfig):
        from tandem.kv_offload.connector import OffloadingConnector

        if config.cache.calculate_kv_scales and self.runner.kv_spec.quantized_layers:
            raise ValueError("calculate_kv_scales cannot be used with KV offloading: saved FP8 blocks would be "
                             "read with another run's scales")
        assert config.kv_offload is not None
        return OffloadingConnector(config.kv_offload, self._kv_caches(), self._kv_compat(weights=True),
                                   config.cache.block_size)

    def _kv_caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer its distinct cache tensors: (K, V), or (K,) where V is K (MLA)."""
        return [(a.k_cache,) if a.v_cache is a.k_cache else (a.k_cache, a.v_cache)
                for a in self.runner.model.attention_layers()]

    def _kv_compat(self, weights: bool = False) -> str:
        """Equal only where KV blocks are interchangeable (``ticket.compat_hash``); ``weights``: also
        the checkpoint's files (a disk tier outlives the process that wrote it)."""
        from tandem.kv_transfer.ticket import compat_hash

        runner = self.runner
        layers = runner.model.attention_layers()
        hf_config = dict(self.hf_config)
        if weights:
            hf_config["_weights"] = weights_identity(self.config.model)
        return compat_hash(hf_config, str(runner.dtype), self.config.cache.block_size,
                           [str(dtype) for dtype in runner.kv_spec.layer_dtypes],
                           [(float(a.k_scale), float(a.v_scale)) for a in layers])

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()

    def has_runnable_requests(self) -> bool:
        return self.scheduler.has_runnable_requests() or self._in_flight is not None

    def has_pending_transfers(self) -> bool:
        return self.scheduler.has_pending_transfers()

    def add_request(self, request: EngineCoreRequest | Request) -> None:
        if isinstance(request, EngineCoreRequest):
            request = Request.from_engine_core_request(request)
        structured = request.sampling_params.structured_outputs
        if structured is not None:
            request.structured = self._structured_outputs().start(structured)
        self.scheduler.add_request(request)

    def _structured_outputs(self) -> StructuredOutputManager:
        if self._structured is None:
            from tandem.engine.structured_output import StructuredOutputManager
            from tandem.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.config.model.tokenizer or self.config.model.model)
            self._structured = StructuredOutputManager(tokenizer, self.vocab_size)
        return self._structured

    def finish_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        stop_reason: int | str | None = None) -> None:
        """End requests from outside the step (aborts, stop strings found by the caller); unknown
        or already finished ids are ignored."""
        self.scheduler.finish_requests(request_ids, status, stop_reason)
        self._drop_orphaned_step()

    def _drop_orphaned_step(self) -> None:
        """A step in flight whose requests all ended has nothing to apply: wait for it, drop it."""
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            self._in_flight[1].resolve()
            self._in_flight = None

    def take_step_tokens(self) -> list[int]:
        """Tokens scheduled in each step since the last call."""
        taken = list(self._step_tokens)
        self._step_tokens.clear()
        return taken

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def expert_load_imbalance(self, min_interval_s: float = 1.0) -> list[float]:
        """MoE models: per sparse layer, max over mean tokens per expert since the last read (layers
        that routed no token left out); [] for dense models or within ``min_interval_s`` of the last
        read (reading the counts syncs a GPU)."""
        now = time.monotonic()
        if now - self._experts_read_at < min_interval_s:
            return []
        self._experts_read_at = now
        return [x for counts in self.runner.take_expert_tokens() if (x := load_imbalance(counts)) is not None]

    def score_logits(self, token_ids: list[int]) -> torch.Tensor:
        """The model's fp32 logits at every position of ``token_ids`` (one prefill on blocks taken
        from the pool and given back): evaluation tools read whole next-token distributions here."""
        if not 0 < len(token_ids) <= self.max_model_len:
            raise ValueError(f"score_logits takes 1 to {self.max_model_len} tokens, got {len(token_ids)}")
        blocks = self.kv.pool.get_new_blocks(-(-len(token_ids) // self.runner.block_size))
        try:
            return self.runner.prefill_logits(token_ids, [b.block_id for b in blocks])
        finally:
            self.kv.free_blocks(blocks)

    def step(self) -> list[CoreOutput]:
        outputs: dict[str, CoreOutput] = {}
        for req in self.scheduler.update_transfers():
            outputs[req.request_id] = CoreOutput(req.request_id, [], finish_reason="error", error=req.error)
        self._fail_uncompiled_grammars(outputs)
        overlap = self.async_scheduling and not self._has_grammars() and not self._speculation_waits()
        if self._in_flight is not None and not overlap:
            # NOTE: a grammar's next mask needs every token sampled so far, so while a request with a
            # grammar is in the engine no step is in flight when the next one is scheduled; likewise
            # for speculation (_speculation_waits)
            drained, self._in_flight = self._in_flight, None
            self._finish_step(*drained, outputs)
        started = time.perf_counter()
        with span("schedule"):
            sched_out = self.scheduler.schedule()
        if sched_out.chunks:
            self._step_tokens.append(sched_out.num_batched_tokens)
        elif self.scheduler.num_loading and self._in_flight is None and self.connector is not None:
            self.connector.wait(0.005)  # every request waits for its KV: the next step would be empty too
        sched_out.grammar_bitmask = self._grammar_bitmask(sched_out)
        try:
            handle = self.runner.launch(sched_out)
        except Exception as e:  # noqa: BLE001 - NOTE: a failing step ends only the requests that fail
            self._apply_result(sched_out, self._recover_failed_step(sched_out, e, outputs), outputs)
            return self._end_step(outputs)
        if overlap:  # the device runs this step while the host reads and applies the previous one
            previous, self._in_flight = self._in_flight, (sched_out, handle) if sched_out.chunks else None
            if previous is None:
                self._flush_kv_events()
                return list(outputs.values())
            sched_out, handle = previous
        self._finish_step(sched_out, handle, outputs)
        if self.scheduler.planner is not None and not overlap:
            self._observe_speculation(sched_out, time.perf_counter() - started)
        return self._end_step(outputs)

    def _speculation_waits(self) -> bool:
        """Speculation runs its steps synchronously (with async scheduling as well): a step that
        verifies drafts, or proposes them, is applied before the next is scheduled (otherwise its
        requests would sit the next step out, their token count unknown, and its proposals would
        come too late), and a step that may verify drafts is scheduled with nothing in flight (a
        request gets drafts only then). The steps the back-off keeps without drafts overlap."""
        planner = self.scheduler.planner
        if planner is None:
            return False
        if self._in_flight is not None and any(c.num_draft_tokens or c.num_lookahead_tokens
                                               for c in self._in_flight[0].chunks):
            return True
        return planner.speculates_next(len(self.scheduler.running))

    def _observe_speculation(self, sched_out: SchedulerOutput, seconds: float) -> None:
        """Speculation sizes its drafts by the step cost, and picks its policy per batch size by the
        decode steps' measured tokens per second."""
        planner = self.scheduler.planner
        assert planner is not None
        # NOTE: a draft model proposes during the step before the one that verifies: its time is
        # charged to the step that uses the drafts, or alternating policies would each be billed the other's
        drafted_now, drafted_before = self._draft_seconds
        seconds += drafted_before - drafted_now
        planner.cost.observe(sched_out.num_batched_tokens, seconds)
        speculated = self.scheduler.last_step_speculated
        if speculated is not None and all(len(c.token_ids) == 1 or c.num_draft_tokens for c in sched_out.chunks):
            planner.observe_step(len(sched_out.chunks), speculated, self._last_emitted, seconds)

    def _has_grammars(self) -> bool:
        if self._structured is None:
            return False  # no request ever asked for a grammar
        return any(req.structured is not None for req in self.scheduler.requests.values())

    def _finish_step(self, sched_out: SchedulerOutput, handle: StepHandle, outputs: dict[str, CoreOutput]) -> None:
        """Wait for a launched step and apply what it sampled."""
        try:
            result = handle.resolve()
        except Exception as e:  # noqa: BLE001 - NOTE: a failing step ends only the requests that fail
            result = self._recover_failed_step(sched_out, e, outputs)
        self._apply_result(sched_out, result, outputs)

    def _end_step(self, outputs: dict[str, CoreOutput]) -> list[CoreOutput]:
        self._drop_orphaned_step()
        self._flush_kv_events()
        return list(outputs.values())

    def _apply_result(self, sched_out: SchedulerOutput, result: RunnerOutput, outputs: dict[str, CoreOutput]) -> None:
        with span("update"):
            updated = self.scheduler.update_from_output(sched_out, result.sampled, result.emitted, result.drafts)
            self._last_emitted = sum(req.num_step_tokens for req in updated)
            self._draft_seconds = (result.draft_seconds, self._draft_seconds[0])
            self._advance_grammars(updated)
        for rid, prompt_lp in result.prompt_logprobs.items():
            outputs[rid] = CoreOutput(rid, [], prompt_logprobs=prompt_lp)
        for req in updated:
            out = outputs.setdefault(req.request_id, CoreOutput(req.request_id, []))
            out.new_token_ids.extend(req.output_token_ids[-req.num_step_tokens:])
            lp = result.logprobs.get(req.request_id)
            if lp is not None:
                out.new_logprobs = [lp]
            elif (verified := result.emitted_logprobs.get(req.request_id)) is not None:
                out.new_logprobs = verified[:req.num_step_tokens]  # the tokens taken (up to a stop)
            out.num_cached_tokens = max(0, req.num_cached_tokens)
            if req.is_finished:
                out.finish_reason = req.status.finish_reason
                out.stop_reason = req.stop_reason
                out.kv_transfer_params = req.kv_transfer_params
                out.phase_times = req.phase_times(time.monotonic())
            if self.scheduler.planner is not None:  # with every token: a stop string or an abort may end it here
                out.spec_counts = req.spec_counts

    # -- structured outputs ------------------------------------------------------------------------
    def _fail_uncompiled_grammars(self, outputs: dict[str, CoreOutput]) -> None:
        if self._structured is None:
            return  # no request ever asked for a grammar: nothing to look for
        for req in list(self.scheduler.waiting):
            if req.structured is not None and req.structured.error is not None:
                self._fail_request(req.request_id, RuntimeError(req.structured.error), outputs)

    def _grammar_bitmask(self, sched_out: SchedulerOutput) -> dict[str, Any] | None:
        if self._structured is None:
            return None
        grammars, drafts = {}, {}
        for c in sched_out.chunks:
            req = self.scheduler.requests.get(c.request_id)
            if c.sample and req is not None and req.structured is not None:
                grammars[c.request_id] = req.structured
                if c.num_draft_tokens:  # a mask for the last token and each draft
                    drafts[c.request_id] = c.token_ids[1:]
        return self._structured.bitmask(grammars, drafts) if grammars else None

    def _advance_grammars(self, updated: list[Request]) -> None:
        """Each token a step gave (accepted drafts too) advances its request's grammar; a complete
        grammar ends the request (with ignore_eos the end-of-sequence token the grammar asks for
        does not). Drafts never complete a grammar (``valid_prefix``): only a step's last token can."""
        for req in updated:
            if req.structured is None or self._structured is None:
                continue
            done = False
            for token in req.output_token_ids[len(req.output_token_ids) - req.num_step_tokens:]:
                done = self._structured.accept(req.request_id, req.structured, token)
            if done and not req.is_finished:
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)

    def _recover_failed_step(self, sched_out: SchedulerOutput, error: Exception,
                             outputs: dict[str, CoreOutput]) -> RunnerOutput:
        """A step raised. Rerun each of its chunks alone (a chunk's KV writes are idempotent, and
        nothing of the failed step was applied), keep what succeeds, and end each request whose
        own chunk fails with an error; the engine keeps serving. With async scheduling the steps
        in flight cannot be replayed: their requests all fail."""
        logger.exception("a step of %d chunks failed; isolating the request(s) at fault", len(sched_out.chunks))
        if self.async_scheduling:
            failed = {c.request_id for c in sched_out.chunks}
            if self._in_flight is not None:
                failed |= {c.request_id for c in self._in_flight[0].chunks}
                self._in_flight = None
            for rid in failed:
                self._fail_request(rid, error, outputs)
            return RunnerOutput()
        new = {n.request_id: n for n in sched_out.new_requests}
        result = RunnerOutput()
        for chunk in sched_out.chunks:
            alone = SchedulerOutput(chunks=[chunk], new_requests=[new[chunk.request_id]] if chunk.request_id in new
                                    else [])
            row = (sched_out.grammar_bitmask or {}).get(chunk.request_id)
            alone.grammar_bitmask = {chunk.request_id: row} if row is not None else None
            try:
                part = self.runner.execute(alone)
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._fail_request(chunk.request_id, e, outputs)
                continue
            result.sampled.update(part.sampled)
            result.emitted.update(part.emitted)
            result.logprobs.update(part.logprobs)
            result.prompt_logprobs.update(part.prompt_logprobs)
            result.emitted_logprobs.update(part.emitted_logprobs)
            result.drafts.update(part.drafts)
            result.draft_seconds += part.draft_seconds
        return result

    def _fail_request(self, request_id: str, error: Exception, outputs: dict[str, CoreOutput]) -> None:
        message = f"request failed in the engine: {type(error).__name__}: {error}"
        logger.error("request %s: %s", request_id, message)
        if self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR):
            outputs[request_id] = CoreOutput(request_id, [], finish_reason="error", error=message)

    def _flush_kv_events(self) -> None:
        """One sequence-numbered batch per step that changed the cache (seq counts batches)."""
        events = self.kv.pool.take_events()
        if self.connector is not None:
            events.extend(tier_events(self.connector.take_tier_changes(), self.kv.block_size))
        if not events:
            return
        batch = KVEventBatch(self._kv_event_seq, time.time(), events)
        self._kv_event_seq += 1
        if self.kv_event_sink is not None:
            self.kv_event_sink(batch)
        else:
            self._kv_event_backlog.append(batch)

    def take_kv_events(self) -> list:
        """Events not sent to a sink, oldest first (at most the last KV_EVENT_BACKLOG batches)."""
        self._flush_kv_events()
        events = [e for batch in self._kv_event_backlog for e in batch.events]
        self._kv_event_backlog.clear()
        return events

    def settle_offload(self, timeout_s: float = 30.0) -> None:
        """Wait for the KV offload copies that ended requests queued, and apply them (their blocks
        go back to the pool). Offload jobs always end; a P/D connector's leases are not waited for."""
        if self.connector is None:
            return
        deadline = time.monotonic() + timeout_s
        while self.connector.offload_busy() and time.monotonic() < deadline:
            time.sleep(0.002)
            self.scheduler.update_transfers()
        self._flush_kv_events()

    def assert_idle(self) -> None:
        """No request in flight: every block free, every reference count 0."""
        self.settle_offload()
        assert not self.scheduler.has_unfinished_requests(), "scheduler still holds requests"
        assert self._in_flight is None, "a step is still in flight"
        assert not self.scheduler.has_pending_transfers(), "KV leases or loads still hold blocks"
        self.kv.pool.assert_idle()
        if self.connector is not None:
            self.connector.check_idle()


def tier_events(changes: list[TierChange], block_size: int) -> list[KVEvent]:
    """KV events of the offload tiers' changes (one BlockStored per block: each has its tokens)."""
    events: list[KVEvent] = []
    for change in changes:
        if change.stored:
            events.extend(BlockStored([h], None, list(tokens), block_size, medium=change.medium)
                          for h, tokens in change.blocks)
        elif change.blocks:
            events.append(BlockRemoved([h for h, _ in change.blocks], medium=change.medium))
    return events


def weights_identity(model: ModelConfig) -> str:
    """The checkpoint as files (name, size, mtime) or, for dummy weights, the seed that makes them."""
    if model.load_format == "dummy":
        return f"dummy:{model.seed}"
    root = Path(model.model).resolve()
    files = sorted(p for p in root.glob("*.safetensors"))
    return f"{root}:" + ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
