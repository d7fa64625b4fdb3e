"""Sampling from a step's logits: penalties, bias, temperature, top-k/top-p/min-p, logprobs.

NOTE: a request with a ``seed`` draws only from its own ``torch.Generator``, exactly one
vocabulary-sized draw per sampled token, so its tokens do not depend on what else is in the batch.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.
Temperature, min-p, top-k, top-p and the draw are one call of ``sample_fn`` over the whole batch;
the only device-to-host sync of a step is reading the sampled ids back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tandem.h2d import to_device
from tandem.kernels.sampling import sample_ref
from tandem.outputs import TopLogprobs  # the one logprobs type, engine core to output processor
from tandem.sampling_params import SamplingParams, SamplingType


@dataclass
class SamplingState:
    """What the runner keeps per request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


def compute_top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TopLogprobs]:
    """logprobs [R, V] (normalised), token_ids [R] -> per-row chosen logprob, rank and top-k."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
    max_k = max(ks) if ks else 0
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    top_vals_l: list[list[float]] = [[] for _ in ks]
    top_ids_l: list[list[int]] = [[] for _ in ks]
    if max_k:
        top = logprobs.topk(max_k, dim=1)
        top_vals_l, top_ids_l = top.values.tolist(), top.indices.tolist()
    return [TopLogprobs(ids_l[i], chosen_l[i], ranks_l[i], top_ids_l[i][:k], top_vals_l[i][:k])
            for i, k in enumerate(ks)]


SAMPLING_BACKENDS = ("torch", "triton", "cpu")


def resolve_sampling_backend(name: str, device: torch.device, attention_backend: str) -> str:
    """The sampling kernel, selected apart from attention. auto: Triton's where the step's other
    kernels are Triton's (on CUDA unless the model runs the torch references; on a CPU only with
    the 'triton' attention backend, i.e. under TRITON_INTERPRET=1), tandem's C++ sampler with the
    'cpu' attention backend (its kernels are built), the torch reference elsewhere."""
    if name != "auto":
        if name not in SAMPLING_BACKENDS:
            raise ValueError(f"sampling backend {name!r} unknown; available: {list(SAMPLING_BACKENDS)}")
        return name
    return attention_backend if attention_backend in ("triton", "cpu") else "torch"


def bitmask_kernel(name: str) -> Callable:
    """(logits, bitmask) -> None, masking in place the tokens a grammar does not allow."""
    if name == "triton":
        from tandem.kernels import sampling

        return sampling.apply_token_bitmask
    return apply_token_bitmask_torch


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The torch backend's mask: on a CPU, xgrammar's own C++ loop (about 6x the torch reference
    at 32 x 8192 on a 2-core EPYC); elsewhere the torch reference."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.is_contiguous():
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        return
    from tandem.kernels.sampling import apply_token_bitmask_ref

    apply_token_bitmask_ref(logits, bitmask)


def sampling_kernel(name: str) -> Callable:
    """(logits, temperature, top_k, top_p, min_p, noise) -> sampled ids (tandem/kernels/sampling.py)."""
    if name == "triton":
        from tandem.kernels import sampling

        return sampling.sample
    if name == "torch":
        return sample_ref
    if name == "cpu":
        from tandem.kernels import cpu_kernels

        return cpu_kernels.sample
    raise ValueError(f"sampling backend {name!r} unknown; available: {list(SAMPLING_BACKENDS)}")


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, device: torch.device | str = "cpu",
                 sample_fn: Callable = sample_ref, bitmask_fn: Callable | None = None) -> None:
        """sample_fn: the draw over processed logits (``sampling_kernel``: the torch reference or
        the Triton kernel); bitmask_fn: how a grammar's bitmask masks logits (``bitmask_kernel``)."""
        self.vocab_size = vocab_size
        self.sample_fn = sample_fn
        self.bitmask_fn = bitmask_fn or bitmask_kernel("torch")
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_state(self, params: SamplingParams, prompt_token_ids: list[int]) -> SamplingState:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        return SamplingState(params, list(prompt_token_ids), [], gen)

    def sample_on_device(self, logits: torch.Tensor, states: list[SamplingState],
                         grammar_bitmask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[TopLogprobs | None]]:
        """logits [R, V] float32, one row per state (masked in place by ``grammar_bitmask``) -> the
        sampled ids, left on the device (no host sync unless a row asks for logprobs). The caller
        appends them to the states' output_token_ids once read."""
        logits = logits[:, : self.vocab_size]
        if grammar_bitmask is not None:  # structured outputs: one row per state (all ones where no grammar)
            self.bitmask_fn(logits, grammar_bitmask)
        want_logprobs = [s.params.logprobs for s in states]
        rows = [i for i, k in enumerate(want_logprobs) if k is not None]
        # logprobs are of the model's distribution, before any processor or temperature
        raw_logprobs = torch.log_softmax(logits, dim=-1) if rows else None
        processed = self._apply_processors(logits, states)
        token_ids = self._sample(processed, states)
        logprobs: list[TopLogprobs | None] = [None] * len(states)
        if raw_logprobs is not None:
            idx = self._to_device(rows, torch.int64)
            ks = [k for k in want_logprobs if k is not None]
            entries = compute_top_logprobs(raw_logprobs[idx], token_ids[idx], ks)
            for i, entry in zip(rows, entries):
                logprobs[i] = entry
        return token_ids, logprobs

    # -- logits processors ---------------------------------------------------------------------
    def _apply_processors(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if not any(needs_processing(s) for s in states):
            return logits
        logits = logits.clone()
        for i, s in enumerate(states):
            if needs_processing(s):
                self._process_row(logits[i], s)
        return logits

    def _process_row(self, row: torch.Tensor, s: SamplingState) -> None:
        p = s.params
        if p.logit_bias:
            biased = [t for t in p.logit_bias if t < self.vocab_size]
            vals = self._to_device([p.logit_bias[t] for t in biased], row.dtype)
            row.index_add_(0, self._to_device(biased, torch.int64), vals)
        if len(s.output_token_ids) < p.min_tokens:
            stop_ids = [t for t in p.all_stop_token_ids if t < self.vocab_size]
            if stop_ids:
                row[self._to_device(stop_ids, torch.int64)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = self._to_device(sorted(set(s.prompt_token_ids) | set(s.output_token_ids)), torch.int64)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and s.output_token_ids:
            ids = self._to_device([t for t in s.output_token_ids if t < self.vocab_size], torch.int64)
            counts = torch.zeros_like(row).index_add_(0, ids, torch.ones(ids.shape, dtype=row.dtype, device=row.device))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


    # -- sampling ------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        params = [s.params for s in states]
        if all(p.sampling_type == SamplingType.GREEDY for p in params):
            return logits.argmax(dim=-1)
        # One vocabulary-sized uniform draw per row: seeded rows from their own generator.
        noise = torch.empty_like(logits)
        noise.uniform_(generator=self.generator)
        for row, s in enumerate(states):
            if s.generator is not None:
                noise[row].uniform_(generator=s.generator)
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        temperature = self._to_device([0.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32)
        top_k = self._to_device([min(p.top_k, self.vocab_size) for p in params], torch.int32)  # k >= V: all
        top_p = self._to_device([p.top_p for p in params], torch.float32)
        min_p = self._to_device([p.min_p for p in params], torch.float32)
        return self.sample_fn(logits.float(), temperature, top_k, top_p, min_p, noise)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, self.device, dtype)


def needs_history(s: SamplingState) -> bool:
    """The logits processing reads the request's earlier output ids (penalties, min_tokens)."""
    p = s.params
    return bool(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
                or len(s.output_token_ids) < p.min_tokens)


def needs_processing(s: SamplingState) -> bool:
    return bool(s.params.logit_bias) or needs_history(s)
