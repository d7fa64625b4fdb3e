"""Sampling from a step's logits: penalties, bias, temperature, top-k/top-p/min-p, logprobs.

NOTE: a request with a ``seed`` draws only from its own ``torch.Generator``, exactly one
vocabulary-sized draw per sampled token, so its tokens do not depend on what else is in the batch.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.sampling_params import SamplingParams, SamplingType


@dataclass
class SamplingState:
    """What the runner keeps per request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class TopLogprobs:
    """Per sampled position: the chosen token's logprob and rank, plus the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TopLogprobs | None]


def compute_top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TopLogprobs]:
    """logprobs [R, V] (normalised), token_ids [R] -> per-row chosen logprob, rank and top-k."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
    max_k = max(ks) if ks else 0
    top_vals, top_ids = (logprobs.topk(max_k, dim=1) if max_k else (None, None))
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    top_vals_l = top_vals.tolist() if max_k else None
    top_ids_l = top_ids.tolist() if max_k else None
    out = []
    for i, k in enumerate(ks):
        out.append(TopLogprobs(ids_l[i], chosen_l[i], ranks_l[i],
                               top_ids_l[i][:k] if k else [], top_vals_l[i][:k] if k else []))
    return out


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_state(self, params: SamplingParams, prompt_token_ids: list[int]) -> SamplingState:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        return SamplingState(params, list(prompt_token_ids), [], gen)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        """logits [R, V] float32, one row per state."""
        logits = logits[:, : self.vocab_size]
        want_logprobs = [s.params.logprobs for s in states]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None
        processed = self._apply_processors(logits, states)
        token_ids = self._sample(processed, states)
        logprobs: list[TopLogprobs | None] = [None] * len(states)
        rows = [i for i, k in enumerate(want_logprobs) if k is not None]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            entries = compute_top_logprobs(raw_logprobs[idx], token_ids[idx], [want_logprobs[i] for i in rows])
            for i, entry in zip(rows, entries):
                logprobs[i] = entry
        return SamplerOutput(token_ids.tolist(), logprobs)

    # -- logits processors ---------------------------------------------------------------------
    def _apply_processors(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if not any(_needs_processing(s) for s in states):
            return logits
        logits = logits.clone()
        for i, s in enumerate(states):
            if _needs_processing(s):
                self._process_row(logits[i], s)
        return logits

    def _process_row(self, row: torch.Tensor, s: SamplingState) -> None:
        p = s.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < self.vocab_size], dtype=torch.long, device=row.device)
            vals = torch.tensor([p.logit_bias[t] for t in p.logit_bias if t < self.vocab_size],
                                dtype=row.dtype, device=row.device)
            row.index_add_(0, ids, vals)
        if len(s.output_token_ids) < p.min_tokens:
            stop_ids = [t for t in p.all_stop_token_ids if t < self.vocab_size]
            if stop_ids:
                row[torch.tensor(stop_ids, device=row.device)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(s.prompt_token_ids) | set(s.output_token_ids)), dtype=torch.long,
                                device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and s.output_token_ids:
            counts = torch.bincount(torch.tensor(s.output_token_ids, device=row.device),
                                    minlength=self.vocab_size)[: self.vocab_size].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    # -- sampling ------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(states) if s.params.sampling_type != SamplingType.GREEDY]
        if not random_rows:
            return greedy
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [states[i].params for i in random_rows])
        # Exponential race: argmax(p / q), q ~ Exp(1), is a draw from p; one draw of V per row.
        # q = -log(u) with u ~ U[0, 1) (4x faster than exponential_ on CPU).
        u = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(random_rows) if states[i].generator is None]
        if len(unseeded) == len(random_rows):
            u.uniform_(generator=self.generator)
        elif unseeded:
            u[unseeded] = torch.rand(len(unseeded), probs.shape[1], generator=self.generator,
                                     device=probs.device, dtype=probs.dtype)
        for j, i in enumerate(random_rows):
            gen = states[i].generator
            if gen is not None:
                u[j].uniform_(generator=gen)
        # u = 0 would give q = inf and score 0 even for a token with p > 0: with one surviving token
        # the row would be all zeros and argmax could pick a filtered-out token. tiny keeps q finite.
        greedy[idx] = (probs / u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_()).argmax(dim=-1)
        return greedy


def _needs_processing(s: SamplingState) -> bool:
    p = s.params
    return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
                or len(s.output_token_ids) < p.min_tokens)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then min-p, then top-k and top-p (each row keeps at least its best token)."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temp[:, None]
    min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= ks[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    ps = torch.tensor(top_p, dtype=logits.dtype, device=dev)
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
    drop = cum_before >= ps[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
