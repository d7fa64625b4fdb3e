"""Model runner: scheduler output -> flat batch tensors -> model -> logits of sampled rows -> tokens.

NOTE: within a step, sequences are ordered decodes first (one token each), then prefill chunks; the
flat batch is their tokens concatenated. Logits are computed only for rows that are sampled and,
for requests asking for prompt logprobs, for the prompt positions in their chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tandem.config import CacheConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from tandem.h2d import to_device
from tandem.kernels.sampling import sampling_probs
from tandem.model.attention import AttentionMetadata, CommonAttentionMetadata, get_backend
from tandem.model.cpu_gemm import plan_cpu_gemm
from tandem.model.interface import CausalLM
from tandem.model.loader import load_model, read_hf_config, resolve_dtype
from tandem.model.moe import take_expert_tokens
from tandem.profiling import span
from tandem.quantization import PrecisionReport, apply_precision, checkpoint_precision, load_policy, plan_int8_routes
from tandem.quantization.checkpoint import CheckpointQuantization
from tandem.runner.batch import batch_order, describe_chunks
from tandem.runner.cpu_malloc import tune_glibc_malloc
from tandem.runner.drafter import Drafter, DraftModel
from tandem.runner.eagle_drafter import EagleDrafter
from tandem.runner.kv_cache_spec import KVCacheSpec
from tandem.runner.kv_sizing import gpu_kv_budget, profile_batch
from tandem.runner.sampler import (
    Sampler,
    SamplingState,
    TopLogprobs,
    bitmask_kernel,
    compute_top_logprobs,
    needs_history,
    resolve_sampling_backend,
    sampling_kernel,
)
from tandem.runner.weight_offload import LayerOffloader
from tandem.sampling_params import SamplingParams, SamplingType
from tandem.scheduler_output import PLACEHOLDER_TOKEN, ScheduledChunk, SchedulerOutput
from tandem.spec_decode.rejection import greedy_verify, rejection_sample
from tandem.utils import cdiv

if TYPE_CHECKING:
    from tandem.kv_transfer.shm import SharedKVRegion
    from tandem.runner.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TopLogprobs] = field(default_factory=dict)
    # request id -> (position of the first scored prompt token, entries for consecutive positions)
    prompt_logprobs: dict[str, tuple[int, list[TopLogprobs]]] = field(default_factory=dict)
    # chunks with draft tokens: every token the step gives, accepted drafts then the target's own
    # (``sampled`` holds the first)
    emitted: dict[str, list[int]] = field(default_factory=dict)
    # chunks with drafts whose request asks for logprobs: one entry per emitted token
    emitted_logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)
    # a draft model's proposals for the next step: request id -> (tokens they follow, drafts)
    drafts: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    draft_seconds: float = 0.0  # the drafter's time in this step (it reads its drafts back: synchronous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_backend_name(name: str, device: torch.device) -> str:
    """auto: the Triton kernels on a CUDA GPU; on a CPU the C++ decode kernel where it could be
    built here, else the torch references."""
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        from tandem.kernels import cpu_kernels

        return "cpu" if device.type == "cpu" and cpu_kernels.available() else "torch"
    return name


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, *, share_kv_cache: bool = False,
                 scheduler_config: SchedulerConfig | None = None,
                 speculative_config: SpeculativeConfig | None = None) -> None:
        """share_kv_cache: on CPU, keep the KV cache in a shared-memory region (``self.kv_region``)
        that decode workers on this host can read (tandem/kv_transfer/shm.py). scheduler_config:
        the largest step, profiled on a GPU to size the KV cache (tandem/runner/kv_sizing.py).
        speculative_config: with method draft_model or eagle, the runner holds the ``Drafter``, whose cache
        shares the KV budget and the block ids. The sampling kernel follows the attention backend
        (``resolve_sampling_backend``)."""
        self.device = resolve_device(model_config.device)
        if self.device.type == "cpu":
            tune_glibc_malloc()
        self.hf_config = read_hf_config(model_config.model)
        self.dtype = resolve_dtype(model_config.dtype, self.hf_config, self.device)
        torch.manual_seed(model_config.seed)
        self.attention_backend = resolve_backend_name(model_config.attention_backend, self.device)
        backend = get_backend(self.attention_backend)
        # turns each step's CommonAttentionMetadata into the backend's own metadata
        self.attn_metadata_builder = backend.make_builder(self.device)
        prequantized = CheckpointQuantization.from_hf_config(self.hf_config)
        policy = load_policy(model_config.quantization, model_config.precision_policy)
        if prequantized and policy:
            raise ValueError(f"{model_config.model} is already quantized ({prequantized.method}); quantization and "
                             "precision_policy apply to float checkpoints")
        self.model: CausalLM = load_model(model_config.model, self.dtype, self.device, backend,
                                          model_config.load_format, model_config.seed, prequantized)
        # each linear layer's precision (tandem/quantization), before the GEMM plan skips quantized layers
        self.precision: PrecisionReport | None = (
            apply_precision(self.model, policy) if policy
            else checkpoint_precision(self.model, f"checkpoint ({prequantized.method})") if prequantized else None)
        if self.precision is not None and self.device.type == "cpu":
            plan_int8_routes(self.model, self.dtype)
        # which GEMM each fp32 linear layer uses at each row count, measured on this CPU
        self.gemm_choices = plan_cpu_gemm(self.model, model_config.cpu_gemm) if self.device.type == "cpu" else {}
        self.weight_offloader = self._offload_weights(model_config.cpu_offload_gb)
        self.args = self.model.args
        self.block_size = cache_config.block_size
        self.model_config = model_config
        self.decode_graphs: DecodeGraphs | None = None  # set by setup_decode_graphs once max_model_len is known
        self.sampling_backend = resolve_sampling_backend("auto", self.device, self.attention_backend)
        self.sampler = Sampler(self.args.vocab_size, model_config.seed, self.device,
                               sampling_kernel(self.sampling_backend), bitmask_kernel(self.sampling_backend))
        self.states: dict[str, SamplingState] = {}
        self._last = StepHandle()  # the latest launched step (placeholders refer to its samples)
        self.kv_spec = KVCacheSpec.build(cache_config, self.dtype, len(self.model.attention_layers()),
                                         self.args.num_kv_heads, self.args.head_dim, self.args.values_share_keys)
        self.drafter = self._make_drafter(speculative_config, model_config)
        self.num_blocks = self._num_blocks(cache_config, scheduler_config)
        self.kv_region: SharedKVRegion | None = None
        self._allocate_kv_cache(share_kv_cache and self.device.type == "cpu")
        # NOTE: scales are calibrated by the first step after the cache exists (never by the
        # profile step's dummy tokens or a graph capture) and frozen after it
        self._calibrating = cache_config.calculate_kv_scales and bool(self.kv_spec.quantized_layers)
        self._set_calibration(self._calibrating)
        take_expert_tokens(self.model)  # the profile step's dummy tokens are not traffic

    def take_expert_tokens(self) -> list[list[int]]:
        """MoE models: per sparse layer, tokens routed to each expert since the last call (a host
        sync on a GPU: callers rate-limit it); [] for dense models."""
        return take_expert_tokens(self.model)

    def _offload_weights(self, gib: float) -> LayerOffloader | None:
        """--cpu-offload-gb: decoder layers' weights to pinned host memory, prefetched a layer ahead."""
        if gib <= 0:
            return None
        if self.device.type != "cuda":
            raise ValueError("cpu_offload_gb keeps GPU weights in host memory; on a CPU device the weights are "
                             "already there (drop --cpu-offload-gb)")
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"cpu_offload_gb: {type(self.model).__name__} has no decoder layer list to offload")
        offloader = LayerOffloader(layers, int(gib * 2**30), self.device)
        torch.cuda.empty_cache()
        logger.info("weight offload: %d of %d decoder layers (%.2f GiB) in host memory, CUDA graphs off",
                    len(offloader.offloaded), len(layers), offloader.offloaded_bytes / 2**30)
        return offloader

    # -- KV cache ----------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        """K and V of one block over every layer, each layer in its own cache dtype."""
        return self.kv_spec.bytes_per_block

    @property
    def kv_cache_dtype(self) -> str:
        """The cache's element type(s) in words, e.g. 'float8_e4m3fn (float32 in layers 0)' (the start-up log)."""
        return self.kv_spec.describe()


    def _set_calibration(self, on: bool) -> None:
        quantized = set(self.kv_spec.quantized_layers)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.calibrate_kv_scales = on and i in quantized

    def _end_calibration(self) -> None:
        """After the first step: the scales it set stay for the cache's lifetime."""
        self._calibrating = False
        self._set_calibration(False)
        layers = self.model.attention_layers()
        k = [float(layers[i].k_scale) for i in self.kv_spec.quantized_layers]
        v = [float(layers[i].v_scale) for i in self.kv_spec.quantized_layers]
        logger.info("KV cache scales calibrated on the first batch: k %.3g..%.3g, v %.3g..%.3g",
                    min(k), max(k), min(v), max(v))

    def _make_drafter(self, config: SpeculativeConfig | None, model_config: ModelConfig) -> Drafter | None:
        """The proposer that runs in the runner: the draft model or the EAGLE head (n-gram proposals
        are the scheduler's)."""
        if config is None or config.method == "ngram":
            return None
        if config.method in ("eagle", "eagle3"):
            return EagleDrafter(config, self.model, self.dtype, self.device, self.attention_backend, self.block_size,
                                model_config.cpu_gemm)
        return DraftModel(config, self.args.vocab_size, self.dtype, self.device, self.attention_backend,
                          self.block_size, model_config.cpu_gemm, model_config.seed)

    def _num_blocks(self, cfg: CacheConfig, sched: SchedulerConfig | None) -> int:
        if cfg.num_gpu_blocks_override:
            return cfg.num_gpu_blocks_override
        if cfg.kv_cache_memory is not None:
            budget = int(cfg.kv_cache_memory)
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            peak = self.profile_run(sched.max_num_batched_tokens, sched.max_num_seqs) if sched else 2 * 2**30
            budget = gpu_kv_budget(total, cfg.gpu_memory_utilization, total - free, peak)
            logger.info("KV cache budget %.2f GiB: %.0f%% of %.1f GiB, %.2f GiB in use, activation peak %.2f GiB",
                        budget / 2**30, 100 * cfg.gpu_memory_utilization, total / 2**30, (total - free) / 2**30,
                        peak / 2**30)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        per_block = self.kv_bytes_per_block + (self.drafter.kv_bytes_per_block if self.drafter is not None else 0)
        num = budget // per_block
        if num < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is smaller than one block "
                             f"({per_block} bytes); raise kv_cache_memory")
        return num

    @torch.inference_mode()
    def prefill_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] at every position of one paged prefill into
        ``block_ids`` (the caller owns them; nothing is sampled and no request state is kept)."""
        request_id = "\x00prefill-logits"  # cannot collide: request ids reaching the engine are printable
        chunk = ScheduledChunk(request_id, token_ids, 0, block_ids, sample=False, num_prompt_tokens=len(token_ids))
        self.states[request_id] = self.sampler.make_state(SamplingParams(), token_ids)
        try:
            batch = self._prepare([chunk])
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            if self._calibrating:  # as after a step: the first batch sets the KV scales, then they hold
                self._end_calibration()
            return self.model.compute_logits(hidden)[:, : self.args.vocab_size]
        finally:
            self.states.pop(request_id)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> int:
        """One step at the largest batch (num_tokens over num_seqs sequences, sampled) on temporary
        KV blocks -> bytes allocated at its peak above what was allocated before, excluding those
        blocks (0 off CUDA). Leaves the KV cache, the runner's states and the pool as they were."""
        step, blocks = profile_batch(num_tokens, num_seqs, self.block_size)
        layers = self.model.attention_layers()
        saved = [(attn.k_cache, attn.v_cache) for attn in layers]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        try:
            for i, attn in enumerate(layers):
                attn.k_cache, attn.v_cache = self.kv_spec.new_layer_cache(blocks + 1, i, self.device)
            self.execute(step)
            if not cuda:
                return 0
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - before - (blocks + 1) * self.kv_bytes_per_block)
        finally:
            for attn, (k, v) in zip(layers, saved):
                attn.k_cache, attn.v_cache = k, v
            self.execute(SchedulerOutput(finished_request_ids={r.request_id for r in step.new_requests}))
            if cuda:
                torch.cuda.empty_cache()

    def _allocate_kv_cache(self, shared: bool) -> None:
        """num_blocks for the pool plus one scratch block (id num_blocks) that padded rows of a
        CUDA-graph decode write into; the pool never hands it out."""
        spec, num = self.kv_spec, self.num_blocks + 1
        layers = self.model.attention_layers()
        if shared:
            from tandem.kv_transfer.shm import kv_region_layout, try_shared_region

            self.kv_region = try_shared_region(kv_region_layout(spec.block_shape, num, spec.layer_dtypes,
                                                                spec.tensors_per_layer)[1])
            if self.kv_region is None:
                logger.warning("no shared memory for the KV cache; KV transfers from here go over TCP")
        if self.kv_region is not None:
            views = self.kv_region.layer_views(spec.block_shape, num, spec.layer_dtypes, spec.tensors_per_layer)
            for attn, tensors in zip(layers, views):
                attn.k_cache, attn.v_cache = tensors[0], tensors[-1]  # one tensor: V is K
        else:
            for i, attn in enumerate(layers):
                attn.k_cache, attn.v_cache = spec.new_layer_cache(num, i, self.device)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB), %s", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, self.num_blocks * self.kv_bytes_per_block / 2**20,
                    self.kv_cache_dtype)
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num)
            logger.info("draft model's KV cache: the same %d blocks (%.1f MiB)", self.num_blocks,
                        self.num_blocks * self.drafter.kv_bytes_per_block / 2**20)

    def setup_decode_graphs(self, max_model_len: int, max_num_seqs: int) -> None:
        """Capture decode CUDA graphs (CUDA, unless enforce_eager); on a CPU only with explicit
        ``cuda_graph_sizes``, run eagerly through the same padded buffers."""
        cfg = self.model_config
        cuda = self.device.type == "cuda"
        if cfg.enforce_eager or not (cuda or cfg.cuda_graph_sizes) or self.weight_offloader is not None:
            return  # NOTE: offloaded weights are copied in forward hooks, which a graph replay would skip
        if self.drafter is not None and not self.drafter.runs_with_decode_graphs:
            logger.info("decode CUDA graphs off: the EAGLE-3 head reads hidden states a replay would not refresh")
            return
        from tandem.runner.cuda_graphs import DecodeGraphs, default_capture_sizes

        sizes = cfg.cuda_graph_sizes or default_capture_sizes(max_num_seqs)
        max_blocks = cdiv(max_model_len, self.block_size)
        self._set_calibration(False)  # graphs record the fused path; calibration waits for the first step
        self.decode_graphs = DecodeGraphs(self.model, self.attn_metadata_builder, self.device, sizes, max_blocks,
                                          self.block_size, scratch_block=self.num_blocks, capture=cuda)
        self._set_calibration(self._calibrating)
        take_expert_tokens(self.model)  # nor the graph captures

    # -- one step -------------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.launch(out).resolve()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> StepHandle:
        """Queue one step on the device; its sampled ids are read back by ``resolve()``. A chunk's
        PLACEHOLDER_TOKEN is the id the previous launched step sampled for that request."""
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
        if self.drafter is not None:  # preempted: recomputed into new blocks
            self.drafter.forget([*out.finished_request_ids, *out.preempted_request_ids])
        for new in out.new_requests:
            self.states[new.request_id] = self.sampler.make_state(new.sampling_params, new.prompt_token_ids)
        if out.is_empty:
            return StepHandle(result=RunnerOutput())
        chunks = sorted(out.chunks, key=batch_order)
        if any(needs_history(self.states[c.request_id]) for c in chunks if c.sample):
            self._last.resolve()  # penalties and min_tokens read every earlier output token
        if self._graph_step(chunks):
            handle, hidden = self._run_graph_decode(chunks, out.grammar_bitmask)
        else:
            with span("prepare_inputs"):
                batch = self._prepare(chunks)
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            with span("lm_head"):
                logits = self.model.compute_logits(hidden[batch.logits_indices])
            with span("sample"):
                verified = self._verify_drafts(batch.draft_rows, logits, out.grammar_bitmask)
                handle = self._sample(chunks, logits, batch.sample_rows, batch.prompt_rows, out.grammar_bitmask,
                                      verified)
                for rid, emitted in verified.emitted.items():  # the step succeeded: its tokens count
                    self.states[rid].output_token_ids.extend(emitted)
        if self._calibrating:
            self._end_calibration()
        if self.drafter is not None and self.drafter.ready:
            if self.drafter.needs_tokens(chunks):
                self._last.resolve()  # speculation runs synchronously: every token so far is known
                self._draft(chunks, handle.resolve(), hidden)
            else:  # nothing waits for this step's tokens (async scheduling may overlap it)
                self.drafter.observe(chunks, hidden)
        self._last = handle
        return handle

    def _draft(self, chunks: list[ScheduledChunk], result: RunnerOutput, hidden: torch.Tensor) -> None:
        """The draft model's proposals for the next step, into ``result``. The step itself has
        succeeded (its tokens are in the sampling states): a failing drafter only costs its
        proposals, and the requests it was computing start again from their first position."""
        assert self.drafter is not None
        started = time.perf_counter()
        try:
            with span("draft"):
                result.drafts = self.drafter.propose(
                    chunks, lambda rid: self.states[rid].prompt_token_ids + self.states[rid].output_token_ids,
                    result.sampled, hidden)
        except Exception:  # proposals are an optimisation: the step's tokens stand
            logger.exception("the draft model failed; this step proposes nothing")
            self.drafter.forget([c.request_id for c in chunks])
        result.draft_seconds = time.perf_counter() - started

    def _input_ids(self, chunks: list[ScheduledChunk], ids: np.ndarray) -> torch.Tensor:
        """The flat input ids on the device, placeholders replaced by the previous step's samples
        (device to device: no host sync)."""
        dev = self._to_device(ids)
        holes = np.flatnonzero(ids == PLACEHOLDER_TOKEN)
        if len(holes):
            ends = np.cumsum([len(c.token_ids) for c in chunks]) - 1  # a placeholder is a chunk's last token
            owner = {int(e): c.request_id for e, c in zip(ends, chunks)}
            rows = [self._last.row_of[owner[int(h)]] for h in holes]
            assert self._last.tokens is not None, "a placeholder stands for a token the last step sampled"
            dev[self._to_device(holes)] = self._last.tokens[self._to_device(rows, torch.int64)]
        return dev

    def _graph_step(self, chunks: list[ScheduledChunk]) -> bool:
        """A decode-only step that a captured batch size holds (prompt logprobs never are: decodes)."""
        graphs = self.decode_graphs
        return graphs is not None and all(len(c.token_ids) == 1 for c in chunks) \
            and graphs.fits(len(chunks), max(len(c.block_ids) for c in chunks))

    def _run_graph_decode(self, chunks: list[ScheduledChunk],
                          grammar: dict[str, Any] | None) -> tuple[StepHandle, torch.Tensor]:
        graphs = self.decode_graphs
        assert graphs is not None, "_graph_step chose this path"
        common, positions = self._describe(chunks)
        ids = self._input_ids(chunks, np.array([c.token_ids[0] for c in chunks], dtype=np.int64))
        hidden = graphs.run(ids, torch.from_numpy(positions), common)
        rows = [i for i, c in enumerate(chunks) if c.sample]  # a 1-token prompt chunk need not sample
        sample_rows = None if len(rows) == len(chunks) else self._to_device(rows, torch.int64)
        return self._sample(chunks, self.model.compute_logits(hidden), sample_rows, grammar=grammar), hidden

    def _describe(self, chunks: list[ScheduledChunk]) -> tuple[CommonAttentionMetadata, np.ndarray]:
        return describe_chunks(chunks, self.block_size)

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Batch:
        common, positions = self._describe(chunks)
        input_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks])
        logits_rows: list[int] = []  # flat token index of every row of the logits
        sample_rows: list[int] = []  # rows of the logits that are sampled, in chunk order
        prompt_rows: list[tuple[ScheduledChunk, int, int]] = []  # (chunk, first flat index, count)
        draft_rows: list[tuple[ScheduledChunk, int]] = []  # (chunk with drafts, first of its 1 + k rows)
        for c, start in zip(chunks, common.query_start_loc.tolist()):
            num_prompt_scored = self._num_prompt_logprob_rows(c)
            if num_prompt_scored:
                prompt_rows.append((c, len(logits_rows), num_prompt_scored))
                logits_rows.extend(range(start, start + num_prompt_scored))
            if c.num_draft_tokens:  # the last token and each draft score the token after it
                draft_rows.append((c, len(logits_rows)))
                logits_rows.extend(range(start, start + len(c.token_ids)))
            elif c.sample:
                sample_rows.append(len(logits_rows))
                logits_rows.append(start + len(c.token_ids) - 1)
        meta = self.attn_metadata_builder.build(common)
        return _Batch(self._input_ids(chunks, input_ids), self._to_device(positions), meta,
                      self._to_device(logits_rows, torch.int64), prompt_rows,
                      self._to_device(sample_rows, torch.int64), draft_rows)

    def _to_device(self, values: np.ndarray | list, dtype: torch.dtype | None = None) -> torch.Tensor:
        return to_device(values, self.device, dtype)

    def _num_prompt_logprob_rows(self, c: ScheduledChunk) -> int:
        """Rows in this chunk whose next token is a prompt token (position p scores token p + 1)."""
        state = self.states[c.request_id]
        if state.params.prompt_logprobs is None:
            return 0
        last_scored = c.num_prompt_tokens - 2
        return max(0, min(c.start_pos + len(c.token_ids) - 1, last_scored) - c.start_pos + 1)

    def _sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor, sample_rows: torch.Tensor | None = None,
                prompt_rows: Sequence[tuple[ScheduledChunk, int, int]] = (),
                grammar: dict[str, Any] | None = None, verified: RunnerOutput | None = None) -> StepHandle:
        """sample_rows: the logits rows to sample (None: every row); prompt_rows: prompt-logprob
        rows; grammar: request id -> its bitmask row (structured outputs); verified: the chunks
        with drafts, already resolved (``_verify_drafts``)."""
        result = verified or RunnerOutput()
        for c, first, count in prompt_rows:
            state = self.states[c.request_id]
            targets = self._to_device(state.prompt_token_ids[c.start_pos + 1:c.start_pos + 1 + count], torch.int64)
            lp = torch.log_softmax(logits[first:first + count, : self.args.vocab_size], dim=-1)
            k = state.params.prompt_logprobs
            assert k is not None, "a chunk has prompt-logprob rows only when its request asks for them"
            result.prompt_logprobs[c.request_id] = (c.start_pos + 1,
                                                    compute_top_logprobs(lp, targets, [k] * count))
        sampled_chunks = [c for c in chunks if c.sample and not c.num_draft_tokens]
        if not sampled_chunks:
            return StepHandle(result=result)
        states = [self.states[c.request_id] for c in sampled_chunks]
        sample_logits = logits if sample_rows is None or len(sample_rows) == logits.shape[0] else logits[sample_rows]
        tokens, logprobs = self.sampler.sample_on_device(sample_logits, states,
                                                         self._grammar_bitmask(sampled_chunks, grammar))
        for c, entry in zip(sampled_chunks, logprobs):
            if entry is not None:
                result.logprobs[c.request_id] = entry
        return StepHandle([c.request_id for c in sampled_chunks], tokens, states, result)

    def _verify_drafts(self, draft_rows: list[tuple[ScheduledChunk, int]], logits: torch.Tensor,
                       grammar: dict[str, Any] | None = None) -> RunnerOutput:
        """Verify each chunk's drafts against the target at its 1 + k rows: greedy rows by the raw
        argmax, sampled rows by rejection sampling against the sampler's own distribution
        (temperature, top-k, top-p, min-p; n-gram drafts have q = 1), each row masked first by its
        grammar's bitmask where the request has one (grammar: request id -> [1 + k, words]). The tokens are read back here
        (speculation runs with synchronous scheduling); the sampling states are extended by the
        caller once the whole step has succeeded."""
        result = RunnerOutput()
        if not draft_rows:
            return result
        k = max(c.num_draft_tokens for c, _ in draft_rows)
        vocab = self.args.vocab_size
        index = [[first + min(j, c.num_draft_tokens) for j in range(k + 1)] for c, first in draft_rows]
        target = logits[self._to_device(index, torch.int64)][..., :vocab].float()  # [B, k + 1, V]; pads repeat a row
        if grammar and any(c.request_id in grammar for c, _ in draft_rows):
            target = target.contiguous()
            self._mask_draft_rows(draft_rows, target, grammar, k)
        params = [self.states[c.request_id].params for c, _ in draft_rows]
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        drafts = self._to_device([c.token_ids[1:] + [0] * (k - c.num_draft_tokens) for c, _ in draft_rows], torch.int64)
        num_draft = self._to_device([c.num_draft_tokens for c, _ in draft_rows], torch.int64)
        tokens, counts = greedy_verify(drafts, num_draft, target.argmax(-1))
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:  # full-vocabulary probabilities only for the rows that sample
            rows = self._to_device(sampled, torch.int64)
            chosen = [params[i] for i in sampled]
            per_row = [p for p in chosen for _ in range(k + 1)]
            probs = sampling_probs(target[rows].reshape(-1, vocab),
                                   self._to_device([p.temperature for p in per_row], torch.float32),
                                   self._to_device([min(p.top_k, vocab) for p in per_row], torch.int32),
                                   self._to_device([p.top_p for p in per_row], torch.float32),
                                   self._to_device([p.min_p for p in per_row], torch.float32))
            s_tokens, s_counts = rejection_sample(probs.reshape(len(sampled), k + 1, vocab), drafts[rows], None,
                                                  torch.zeros(len(sampled), dtype=torch.bool, device=rows.device),
                                                  self.sampler.generator, num_draft[rows])
            tokens[rows], counts[rows] = s_tokens, s_counts
        for (c, _), row, n in zip(draft_rows, tokens.tolist(), counts.tolist()):
            result.sampled[c.request_id] = row[0]
            result.emitted[c.request_id] = row[:n]
        self._emitted_logprobs(draft_rows, params, target, tokens, result)
        return result

    def _emitted_logprobs(self, draft_rows: list[tuple[ScheduledChunk, int]], params: list[SamplingParams],
                          target: torch.Tensor, tokens: torch.Tensor, result: RunnerOutput) -> None:
        """Logprobs of every emitted token of the requests that ask for them, in one pass: of the
        model's distribution (raw log-softmax), as the sampler reports them."""
        wanted = [(i, len(result.emitted[c.request_id])) for i, ((c, _), p) in enumerate(zip(draft_rows, params))
                  if p.logprobs is not None]
        if not wanted:
            return
        rows = self._to_device([i for i, n in wanted for _ in range(n)], torch.int64)
        cols = self._to_device([j for _, n in wanted for j in range(n)], torch.int64)
        ks = [params[i].logprobs or 0 for i, n in wanted for _ in range(n)]
        entries = compute_top_logprobs(torch.log_softmax(target[rows, cols], dim=-1), tokens[rows, cols], ks)
        for i, n in wanted:
            result.emitted_logprobs[draft_rows[i][0].request_id], entries = entries[:n], entries[n:]

    def _mask_draft_rows(self, draft_rows: list[tuple[ScheduledChunk, int]], target: torch.Tensor,
                         grammar: dict[str, Any], k: int) -> None:
        """target [B, k + 1, V] masked in place: row j of a chunk by its grammar's mask after j drafts
        (pad rows repeat the last), all ones for chunks without a grammar."""
        width = next(iter(grammar.values())).shape[-1]
        mask = torch.full((len(draft_rows), k + 1, width), -1, dtype=torch.int32)
        for i, (c, _) in enumerate(draft_rows):
            rows = grammar.get(c.request_id)
            if rows is not None:
                n = c.num_draft_tokens + 1
                mask[i, :n], mask[i, n:] = rows, rows[-1]
        flat = target.view(-1, target.shape[-1])
        self.sampler.bitmask_fn(flat, mask.view(-1, width).to(self.device, non_blocking=True))

    def _grammar_bitmask(self, sampled: list[ScheduledChunk], grammar: dict[str, Any] | None) -> torch.Tensor | None:
        """One bitmask row per sampled chunk, all ones (-1) for requests without a grammar."""
        if not grammar:
            return None
        width = next(iter(grammar.values())).shape[-1]
        mask = torch.full((len(sampled), width), -1, dtype=torch.int32)
        for i, c in enumerate(sampled):
            row = grammar.get(c.request_id)
            if row is not None:
                mask[i] = row
        return mask.to(self.device, non_blocking=True)


class StepHandle:
    """A launched step. ``tokens`` (device) holds its sampled ids in ``request_ids`` order;
    ``resolve()`` reads them back (the step's one host sync), appends them to the sampling states
    and returns the RunnerOutput. Resolving twice returns the same output."""

    def __init__(self, request_ids: Sequence[str] = (), tokens: torch.Tensor | None = None,
                 states: Sequence[SamplingState] = (), result: RunnerOutput | None = None) -> None:
        self.row_of = {rid: i for i, rid in enumerate(request_ids)}
        self.tokens = tokens
        self._states = states
        self._result = result if result is not None else RunnerOutput()
        self._resolved = tokens is None
        self._host = tokens
        self._copied: torch.cuda.Event | None = None
        if tokens is not None and tokens.is_cuda:
            # queued right behind this step's sampling: resolve() waits for this step only, not
            # for a later one launched meanwhile (asynchronous scheduling)
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def resolve(self) -> RunnerOutput:
        if not self._resolved:
            self._resolved = True
            if self._copied is not None:
                self._copied.synchronize()
            assert self._host is not None, "a step with no tokens is resolved from the start"
            for rid, state, token in zip(self.row_of, self._states, self._host.tolist()):
                state.output_token_ids.append(token)
                self._result.sampled[rid] = token
        return self._result


@dataclass
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    prompt_rows: list[tuple[ScheduledChunk, int, int]]
    sample_rows: torch.Tensor
    draft_rows: list[tuple[ScheduledChunk, int]]
