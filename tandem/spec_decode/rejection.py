"""Rejection sampling for speculative decoding: the output follows the target distribution exactly.

Per sequence, k draft tokens ``d_1..d_k`` were proposed with probabilities ``q_i`` (a draft model's,
or, for an n-gram proposer, certainty: q_i = 1 on ``d_i``), and the target model scored the k + 1
positions, giving ``p_1..p_{k+1}``. Position i accepts ``d_i`` with probability
``min(1, p_i(d_i) / q_i(d_i))``; the first rejection emits one token drawn from the residual
``max(0, p_i - q_i)`` renormalised, and stops; if all k are accepted a bonus token is drawn from
``p_{k+1}``. Greedy rows (temperature 0) accept while ``d_i`` equals the target's argmax and emit
the argmax where they stop. Randomness comes from the caller's generator, so a seeded request
replays exactly.
"""

from __future__ import annotations

import torch

PAD = -1  # output slots after the emitted tokens


def rejection_sample(target_probs: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     greedy: torch.Tensor, generator: torch.Generator | None = None,
                     num_draft: torch.Tensor | None = None,
                     target_argmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """target_probs [B, k + 1, V] (fp32, rows summing to 1); draft_ids [B, k]; draft_probs [B, k, V]
    or None (q = 1 on each draft token); greedy [B] bool; num_draft [B]: draft tokens per row when
    fewer than k (the rest padding: never accepted, their draft_probs rows zero); target_argmax
    [B, k + 1]: the greedy choice (default: the argmax of target_probs).
    Returns (tokens [B, k + 1] with PAD after the emitted ones, number emitted [B] in 1..k + 1)."""
    b, k1, vocab = target_probs.shape
    k = k1 - 1
    device = target_probs.device
    rows = torch.arange(b, device=device)
    p_draft = target_probs[:, :k].gather(2, draft_ids.unsqueeze(-1)).squeeze(-1)  # p_i(d_i) [B, k]
    q_draft = (draft_probs.gather(2, draft_ids.unsqueeze(-1)).squeeze(-1) if draft_probs is not None
               else torch.ones_like(p_draft))
    u = torch.rand((b, k), generator=generator, device=device)
    accept = u * q_draft < p_draft  # u < p / q, without dividing by a zero q
    argmax = target_probs.argmax(-1) if target_argmax is None else target_argmax  # [B, k + 1]
    accept = torch.where(greedy[:, None], draft_ids == argmax[:, :k], accept)
    if num_draft is None:
        num_draft = torch.full((b,), k, device=device)
    first_reject = _first_rejection(accept, num_draft)
    # the token emitted where the run stops: the residual's draw, or the bonus token from p_{k+1}
    stop_p = target_probs[rows, first_reject]  # [B, V]
    if draft_probs is not None:
        stop_q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, first_reject]
    else:
        stop_q = torch.zeros_like(stop_p)
        rejected = first_reject < num_draft
        stop_q[rows[rejected], draft_ids[rows[rejected], first_reject[rejected]]] = 1.0
    residual = torch.clamp(stop_p - stop_q, min=0)
    # NOTE: a residual that is all zero (p == q exactly) cannot happen at a rejection: u < 1 = p/q there
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, stop_p)
    drawn = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    return _emit(draft_ids, first_reject, torch.where(greedy, argmax[rows, first_reject], drawn))


def greedy_verify(draft_ids: torch.Tensor, num_draft: torch.Tensor,
                  target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rows without probabilities: accept while a draft equals the target's argmax, then
    emit the argmax where the run stops. Same arguments and result as ``rejection_sample``."""
    k = draft_ids.shape[1]
    first_reject = _first_rejection(draft_ids == target_argmax[:, :k], num_draft)
    rows = torch.arange(draft_ids.shape[0], device=draft_ids.device)
    return _emit(draft_ids, first_reject, target_argmax[rows, first_reject])


def _first_rejection(accept: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """accept [B, k] -> the first position not accepted, at most num_draft (all real drafts accepted)."""
    b, k = accept.shape
    accept = accept & (torch.arange(k, device=accept.device)[None, :] < num_draft[:, None])
    first = torch.where(accept.all(1), torch.full((b,), k, device=accept.device), (~accept).int().argmax(1))
    return torch.minimum(first, num_draft)


def _emit(draft_ids: torch.Tensor, first_reject: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted drafts, then ``last`` at the first rejection, PAD after it."""
    b, k = draft_ids.shape
    positions = torch.arange(k + 1, device=draft_ids.device)[None, :]
    tokens = torch.cat([draft_ids, torch.zeros_like(draft_ids[:, :1])], 1)
    tokens = torch.where(positions < first_reject[:, None], tokens, PAD)
    tokens[torch.arange(b, device=draft_ids.device), first_reject] = last
    return tokens, first_reject + 1
