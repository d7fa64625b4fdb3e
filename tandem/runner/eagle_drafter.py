"""The EAGLE drafter (``speculative_config`` method ``eagle``): a head over the target's final hidden
states (tandem/model/eagle.py) that proposes the next step's drafts right after a target step.

The head's KV at position p is computed from token p + 1 and the target's feature f_p, so it can
only be computed after the target has computed p and token p + 1 is known (sampled, accepted or a
prompt token). Features the target produced are kept until the head computes their positions:
``pending[r]`` holds the features of positions ``[computed[r], computed[r] + len)`` in order.
Invariants, per request r the drafter has seen:
- the head holds valid KV for ``[0, computed[r])``; positions below the first chunk it saw are a
  prefix hit's blocks, trusted as they are (a head always computes every position before it
  proposes, so a prefix that was proposed from holds the head's KV; one that never was holds stale
  values, which cost acceptance, never correctness: every draft is verified);
- ``computed[r] + len(pending[r])`` is the first position the target has not computed for r, in
  step with the scheduler (a mismatch, after a prefix hit or preemption, starts r again there).
A step appends each chunk's valid features (a verify chunk's rejected drafts are not valid) and
computes, in one forward of the head, the pending positions of every request that proposes now or
whose pending features reached ``MAX_PENDING`` (memory stays bounded while speculation is backed
off). A proposing request's last computed row gives its first draft; each further draft is one
decode step of the head at the next position, on the head's own previous prediction. Those draft
positions are scratch in the lookahead blocks: the next step recomputes them from the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.config import SpeculativeConfig
from tandem.h2d import to_device
from tandem.model.attention import AttentionMetadata, get_backend
from tandem.model.cpu_gemm import plan_cpu_gemm
from tandem.model.eagle import Eagle3LlamaHead, EagleLlamaHead, load_eagle_head
from tandem.model.interface import CausalLM
from tandem.runner.batch import batch_order, describe_chunks
from tandem.runner.drafter import Drafter, Proposals
from tandem.scheduler_output import ScheduledChunk

# positions of target features one request may keep before the head computes them
# NOTE: none are ever dropped: a head over stale KV proposes worse, and the back-off's retries,
# judged by their speed, would then keep speculation off where it pays
MAX_PENDING = 512


@dataclass
class _Pending:
    """One request's target features awaiting the head, for consecutive positions from
    ``EagleDrafter.computed[r]`` on (parts are views of the steps' copies of their valid rows)."""

    parts: list[torch.Tensor] = field(default_factory=list)
    count: int = 0

    def features(self) -> torch.Tensor:
        return torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]

    def clear(self) -> None:
        self.parts, self.count = [], 0


class EagleDrafter(Drafter):
    """Methods eagle and eagle3 (whose features are the target's aux hidden states side by side)."""

    def __init__(self, config: SpeculativeConfig, target: CausalLM, dtype: torch.dtype, device: torch.device,
                 attention_backend: str, block_size: int, cpu_gemm: str) -> None:
        assert config.model is not None, "SpeculativeConfig checks that eagle has a model"
        head = load_eagle_head(config.model, target, dtype, device, get_backend(attention_backend), config.method)
        if device.type == "cpu":
            plan_cpu_gemm(head, cpu_gemm)
        super().__init__(head, device, attention_backend, block_size, dtype)
        self.model: EagleLlamaHead | Eagle3LlamaHead = head
        self.max_position_embeddings = head.args.max_position_embeddings
        self.pending: dict[str, _Pending] = {}
        self.target = target
        if isinstance(head, Eagle3LlamaHead):
            target.model.aux_hidden_layers = head.aux_layers  # type: ignore[attr-defined]
            # NOTE: a CUDA graph replay would leave the aux states of its capture: eager decode
            self.runs_with_decode_graphs = False

    def _target_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The head's input from the target's step: its final hidden states, or for EAGLE-3 the
        residual streams it kept (one row per input token, as ``target_hidden``)."""
        if isinstance(self.model, Eagle3LlamaHead):
            return torch.cat(self.target.model.aux_hidden_states, dim=-1)  # type: ignore[attr-defined]
        return target_hidden

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.draft_tokens(hidden)

    def _step(self, ids: torch.Tensor, state: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
        return self.model(ids, state, positions, meta)  # the head reads its own previous prediction

    def forget(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        super().forget(ids)
        for rid in ids:
            self.pending.pop(rid, None)

    def needs_tokens(self, chunks: list[ScheduledChunk]) -> bool:
        """Also when a request's pending features would reach MAX_PENDING (the head computes them)."""
        return super().needs_tokens(chunks) or any(
            (p := self.pending.get(c.request_id)) is not None and p.count + len(c.token_ids) >= MAX_PENDING
            for c in chunks)

    @torch.inference_mode()
    def observe(self, chunks: list[ScheduledChunk], target_hidden: torch.Tensor) -> None:
        """Every position of a step without drafts is valid (its next token is the one it samples or
        a prompt token): its features are kept, one copy for the step."""
        features = self._target_features(target_hidden).clone()
        for c, end in zip(chunks, np.cumsum([len(c.token_ids) for c in chunks]).tolist()):
            self._append(c, features[end - len(c.token_ids):end])

    @torch.inference_mode()
    def propose(self, chunks: list[ScheduledChunk], tokens_of: Callable[[str], list[int]],
                sampled: Mapping[str, int], target_hidden: torch.Tensor) -> Proposals:
        tokens = [tokens_of(c.request_id) for c in chunks]
        # per chunk, the positions whose next token is known (a verify chunk's accepted ones)
        valid = [max(0, min(len(c.token_ids), len(t) - 1 - c.start_pos)) for c, t in zip(chunks, tokens)]
        starts = np.cumsum([0] + [len(c.token_ids) for c in chunks])
        rows = np.concatenate([np.arange(s, s + v) for s, v in zip(starts.tolist(), valid)])
        # one copy: the step's tensors are freed
        kept = self._target_features(target_hidden)[to_device(rows, self.device, torch.int64)]
        due: list[tuple[ScheduledChunk, torch.Tensor]] = []  # (the head's chunk, its features)
        for c, t, end, v in zip(chunks, tokens, np.cumsum(valid).tolist(), valid):
            pending = self._append(c, kept[end - v:end])
            proposing = bool(c.num_lookahead_tokens) and c.request_id in sampled
            if pending.count and (proposing or pending.count >= MAX_PENDING):
                first = self.computed[c.request_id]
                due.append((ScheduledChunk(c.request_id, t[first + 1:first + 1 + pending.count], first, c.block_ids,
                                           sample=proposing, num_prompt_tokens=c.num_prompt_tokens,
                                           num_lookahead_tokens=c.num_lookahead_tokens if proposing else 0),
                            pending.features()))
        return self._compute(due) if due else {}

    def _append(self, c: ScheduledChunk, features: torch.Tensor) -> _Pending:
        """Keep this chunk's valid features after the request's pending ones."""
        rid = c.request_id
        pending = self.pending.setdefault(rid, _Pending())
        if self.computed.get(rid, -1) + pending.count != c.start_pos:
            self.computed[rid] = c.start_pos  # first seen, or a prefix hit after preemption
            pending.clear()
        if len(features):
            pending.parts.append(features)
            pending.count += len(features)
        return pending

    def _compute(self, due: list[tuple[ScheduledChunk, torch.Tensor]]) -> Proposals:
        """One forward of the head over every due request's pending positions, then the drafts of
        those that propose."""
        due.sort(key=lambda d: batch_order(d[0]))
        inputs = [c for c, _ in due]
        common, positions = describe_chunks(inputs, self.block_size)
        ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in inputs])
        hidden = self.model(to_device(ids, self.device), torch.cat([f for _, f in due]),
                            to_device(positions, self.device), self.builder.build(common))
        for c in inputs:
            self.computed[c.request_id] = c.start_pos + len(c.token_ids)
            self.pending[c.request_id].clear()
        ends = np.cumsum([len(c.token_ids) for c in inputs]) - 1
        proposing = [i for i, c in enumerate(inputs) if c.sample]
        if not proposing:
            return {}
        last = hidden[to_device(ends[proposing], self.device, torch.int64)]
        # a chunk covers positions up to the one before the token just sampled: the drafts follow that token
        return self._decode_drafts([inputs[i] for i in proposing], last, follows=1)
