"""Drafters of speculative decoding that run in the model runner (``Drafter``; the EAGLE head's is
tandem/runner/eagle_drafter.py) and the draft model (``speculative_config`` method ``draft_model``): a smaller
model with the target's tokenizer that proposes the next step's drafts right after a target step.

KV: the drafter has cache tensors of its own, in the target's block layout, and writes them through
the target's block tables (one allocation, two caches). It runs only for the requests that propose
this step (``ScheduledChunk.num_lookahead_tokens``), so a request that does not speculate costs
nothing. Invariant: the drafter holds valid KV for positions ``[0, computed[r])`` of request r,
written by itself for that request: a prefix hit's blocks are not trusted (the drafter's KV there
may be missing), so a request's first proposal computes its whole context. Before proposing, the
drafter computes the request's tokens from ``computed[r]`` up to the one just sampled; then it
proposes ``num_lookahead_tokens`` drafts by greedy decode steps. The token just sampled and the
drafts are scratch positions, in the lookahead blocks the scheduler reserved past the chunk; the
next proposal recomputes the ones that are kept. Preemption (new blocks) and finishing forget r.
Positions below ``computed[r]`` are never rewritten by the target's cache writes (separate tensors)
and never given back while r runs (``trim`` only drops blocks past its tokens). Recomputing a
shared block rewrites the values it already holds (the same tokens at the same positions).

Drafts are the drafter's argmax: a proposal with q = 1 on the proposed token, which the runner's
rejection sampling already verifies exactly (greedy and sampled requests alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from tandem.config import CacheConfig, SpeculativeConfig
from tandem.h2d import to_device
from tandem.model.attention import AttentionMetadata, AttentionMetadataBuilder, get_backend
from tandem.model.cpu_gemm import plan_cpu_gemm
from tandem.model.eagle import Eagle3LlamaHead, EagleLlamaHead
from tandem.model.interface import CausalLM
from tandem.model.loader import load_model, read_hf_config
from tandem.quantization.checkpoint import CheckpointQuantization
from tandem.runner.batch import batch_order, describe_chunks
from tandem.runner.kv_cache_spec import KVCacheSpec
from tandem.scheduler_output import ScheduledChunk

Proposals = dict[str, tuple[int, list[int]]]  # request id -> (tokens the drafts follow, drafts)


class Drafter:
    """What every drafter shares: a small model whose KV cache tensors are its own, in the target's
    block layout and block ids, and ``computed[r]``, the positions whose KV it holds for request r."""

    max_position_embeddings: int | None = None  # the most positions the drafter's model holds
    runs_with_decode_graphs = True  # the target's decode steps may replay CUDA graphs

    def __init__(self, model: CausalLM | EagleLlamaHead | Eagle3LlamaHead, device: torch.device, attention_backend: str,
                 block_size: int, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.builder: AttentionMetadataBuilder = get_backend(attention_backend).make_builder(device)
        args = model.args
        self.kv_spec = KVCacheSpec.build(CacheConfig(block_size=block_size), dtype,
                                         len(model.attention_layers()), args.num_kv_heads, args.head_dim,
                                         args.values_share_keys)
        self.ready = False  # the cache exists (a profile step before it runs the target alone)
        self.computed: dict[str, int] = {}  # request id -> positions whose KV the drafter holds for it

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_spec.bytes_per_block

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """``num_blocks`` as the target's cache (the block ids are shared)."""
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_spec.new_layer_cache(num_blocks, i, self.device)
        self.ready = True

    def forget(self, request_ids: Iterable[str]) -> None:
        """Finished or preempted requests: their KV here is gone (or in blocks given back)."""
        for rid in request_ids:
            self.computed.pop(rid, None)

    def needs_tokens(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether the drafter works on this step's tokens (``propose``, after they are read back)
        rather than only observing it: chunks that verify drafts or will propose."""
        return any(c.num_lookahead_tokens or c.num_draft_tokens for c in chunks)

    def observe(self, chunks: list[ScheduledChunk], target_hidden: torch.Tensor) -> None:
        """After a step that ``needs_tokens`` declined (its tokens may still be in flight): what the
        drafter keeps of it."""

    def propose(self, chunks: list[ScheduledChunk], tokens_of: Callable[[str], list[int]],
                sampled: Mapping[str, int], target_hidden: torch.Tensor) -> Proposals:
        """After a target step: the drafts of every chunk with lookahead whose request got a token.
        tokens_of: the request's tokens so far, the ones this step gave included; target_hidden: the
        target's final hidden states of the step, one row per input token in ``chunks`` order."""
        raise NotImplementedError

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)[:, : self.model.args.vocab_size].argmax(-1)

    def _step(self, ids: torch.Tensor, state: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
        """One decode step of the drafter's model: the output row of each input (state: each row's
        previous output, which an EAGLE head reads and a draft model does not)."""
        return self.model(ids, positions, meta)

    def _decode_drafts(self, chunks: list[ScheduledChunk], state: torch.Tensor, follows: int) -> Proposals:
        """Greedy drafts from each chunk's last output row (``state``): draft 1 is its argmax, and
        draft j + 1 one decode step at position ``start + len - 1 + j`` on draft j, until each chunk
        has its ``num_lookahead_tokens``, longest context first (as the decode kernels group rows).
        follows: how many tokens past the chunk the drafts follow (the token just sampled when the
        chunk does not hold it)."""
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].block_ids))
        chunks = [chunks[i] for i in order]
        state = state[to_device(order, self.device, torch.int64)]
        drafts = torch.zeros((len(chunks), max(c.num_lookahead_tokens for c in chunks)), dtype=torch.int64,
                             device=self.device)  # row i: chunks[i]'s drafts, the first num_lookahead_tokens
        drafts[:, 0] = self._argmax(state)
        for j in range(1, drafts.shape[1]):
            live = [i for i, c in enumerate(chunks) if c.num_lookahead_tokens > j]  # still longest context first
            rows = to_device(live, self.device, torch.int64)
            step = [ScheduledChunk(chunks[i].request_id, [0], chunks[i].start_pos + len(chunks[i].token_ids) - 1 + j,
                                   chunks[i].block_ids, sample=True, num_prompt_tokens=chunks[i].num_prompt_tokens)
                    for i in live]
            common, positions = describe_chunks(step, self.block_size)
            out = self._step(drafts[rows, j - 1], state[rows], to_device(positions, self.device),
                             self.builder.build(common))
            state = state.index_copy(0, rows, out)
            drafts[rows, j] = self._argmax(out)
        return {c.request_id: (c.start_pos + len(c.token_ids) + follows, row[:c.num_lookahead_tokens])
                for c, row in zip(chunks, drafts.tolist())}


class DraftModel(Drafter):
    """Method draft_model: a smaller CausalLM with the target's tokenizer."""

    def __init__(self, config: SpeculativeConfig, target_vocab_size: int, dtype: torch.dtype, device: torch.device,
                 attention_backend: str, block_size: int, cpu_gemm: str, seed: int) -> None:
        assert config.model is not None, "SpeculativeConfig checks that draft_model has a model"
        hf_config = read_hf_config(config.model)
        if CheckpointQuantization.from_hf_config(hf_config):
            raise ValueError(f"speculative_config model {config.model} is quantized; a quantized draft model "
                             "is not supported yet")
        vocab = int(hf_config.get("vocab_size", 0))
        if vocab != target_vocab_size:
            raise ValueError(f"speculative_config model {config.model} has a vocabulary of {vocab} tokens, the "
                             f"target {target_vocab_size}: a draft model must share the target's tokenizer")
        self.max_position_embeddings = int(hf_config.get("max_position_embeddings", 0)) or None
        model = load_model(config.model, dtype, device, get_backend(attention_backend), "auto", seed)
        if device.type == "cpu":
            plan_cpu_gemm(model, cpu_gemm)
        super().__init__(model, device, attention_backend, block_size, dtype)
        self.model: CausalLM = model

    @torch.inference_mode()
    def propose(self, chunks: list[ScheduledChunk], tokens_of: Callable[[str], list[int]],
                sampled: Mapping[str, int], target_hidden: torch.Tensor) -> Proposals:
        inputs: list[ScheduledChunk] = []
        for c in chunks:
            if not c.num_lookahead_tokens or c.request_id not in sampled:
                continue
            tokens = tokens_of(c.request_id)
            start = self.computed.get(c.request_id, 0)
            # the last token is the one just sampled: its position is past every kept one
            assert start < len(tokens) <= c.start_pos + len(c.token_ids) + 1, (c, start, len(tokens))
            inputs.append(ScheduledChunk(c.request_id, tokens[start:], start, c.block_ids, sample=True,
                                         num_prompt_tokens=c.num_prompt_tokens,
                                         num_lookahead_tokens=c.num_lookahead_tokens))
        if not inputs:
            return {}
        inputs.sort(key=batch_order)
        common, positions = describe_chunks(inputs, self.block_size)
        ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in inputs])
        hidden = self.model(to_device(ids, self.device), to_device(positions, self.device), self.builder.build(common))
        rows = np.cumsum([len(c.token_ids) for c in inputs]) - 1
        # the chunk's last input is the token just sampled: the drafts follow it
        proposals = self._decode_drafts(inputs, hidden[to_device(rows, self.device, torch.int64)], follows=0)
        for c in inputs:  # every position but the last (the token just sampled) is kept
            self.computed[c.request_id] = c.start_pos + len(c.token_ids) - 1
        return proposals
