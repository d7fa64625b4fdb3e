"""Sampling one token per row from processed logits: temperature, min-p, top-k, top-p, then an
exponential race. A torch reference and a Triton kernel with the same signature.

The kernel needs no sort and no host sync: it finds each cut-off by a search over the float32
bit pattern (a monotone int key) that probes PROBES thresholds per pass over the row (16: about
four bits per pass), so top-k and top-p together cost about 20 passes over a row, not the ~56 of
a bisection.

Semantics (both implementations; they agree except where float sums differ in the last bit):
- ``temperature[r] == 0``: greedy, the first index of the largest logit.
- z = logits / temperature. min-p keeps z >= max(z) + log(min_p); top-k (0 < k < V) keeps
  z >= the k-th largest z (ties at the cut all kept); top-p (p < 1) then keeps, among those, each
  token whose strictly-larger survivors hold less than p of the survivors' probability mass. The
  largest logit always survives.
- Draw: argmax over survivors of exp(z - max z) / q with q = -log(u), u the row's uniform noise
  (u is clamped to the smallest normal float so q stays finite): the exponential race, a draw from
  the renormalised survivors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """logits, noise [R, V] float32; temperature, top_p, min_p [R] float32; top_k [R] int -> [R] int64."""
    greedy = logits.argmax(dim=-1)
    if logits.shape[0] == 0:
        return greedy
    z, z_max, keep = survivors(logits, temperature, top_k, top_p, min_p)
    scores = torch.exp(z - z_max) / -torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny))
    sampled = torch.where(keep, scores, torch.full_like(scores, -1.0)).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """The distribution ``sample_ref`` draws from, [R, V] float32 rows summing to 1 (greedy rows:
    the tempered softmax over the survivors; callers treat them by argmax)."""
    z, z_max, keep = survivors(logits, temperature, top_k, top_p, min_p)
    mass = torch.where(keep, torch.exp(z - z_max), torch.zeros_like(z))
    return mass / mass.sum(dim=-1, keepdim=True)


def survivors(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = logits / temperature, max z per row, the tokens min-p, top-k and top-p keep)."""
    vocab = logits.shape[1]
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    z = logits / temp[:, None]
    z_max = z.max(dim=-1, keepdim=True).values
    cut = torch.where(min_p[:, None] > 0, z_max + torch.log(min_p[:, None]), torch.full_like(z_max, -float("inf")))
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab)).long()
    if bool((k < vocab).any()):
        cut = torch.maximum(cut, z.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None]))
    keep = (z >= cut) & (z > -float("inf")) | (z == z_max)
    if bool((top_p < 1).any()):
        keep &= _top_p_keep(z, keep, z_max, top_p)
    return z, z_max, keep


def _top_p_keep(z: torch.Tensor, keep: torch.Tensor, z_max: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Survivors of the nucleus among ``keep``: mass strictly above a token's value < p x total."""
    mass = torch.where(keep, torch.exp(z - z_max), torch.zeros_like(z))
    values, order = torch.where(keep, z, torch.full_like(z, -float("inf"))).sort(dim=-1, descending=True)
    sorted_mass = mass.gather(1, order)
    ahead = sorted_mass.cumsum(dim=-1) - sorted_mass
    inside = ahead < top_p[:, None] * mass.sum(dim=-1, keepdim=True)
    last = inside.sum(dim=-1, keepdim=True).clamp_min(1) - 1  # ahead is non-decreasing: a prefix is inside
    return (z >= values.gather(1, last)) | (top_p[:, None] >= 1)


@triton.jit
def _key(x):
    """float32 -> int64 with the same order (a monotone map of the IEEE bit pattern)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _probes(lo, hi, PROBES: tl.constexpr):
    """PROBES thresholds splitting the integer range (lo, hi) into PROBES + 1 parts, increasing."""
    j = tl.arange(0, PROBES).to(tl.int64) + 1
    return lo + ((hi - lo) * j) // (PROBES + 1)


@triton.jit
def _sample_kernel(L, U, TEMP, TOPK, TOPP, MINP, OUT, V, stride_l, stride_u, BLOCK: tl.constexpr,
                   PROBES: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    temp = tl.load(TEMP + row)
    inv_t = 1.0 / tl.where(temp > 0, temp, 1.0)
    k = tl.load(TOPK + row).to(tl.int64)
    top_p = tl.load(TOPP + row)
    min_p = tl.load(MINP + row)
    lrow = L + row * stride_l
    # pass 1: the largest logit, its first index, and the smallest finite key
    best = -float("inf")
    best_idx = 0
    lo_key = tl.full((), 0x7FFFFFFF, tl.int64)
    for start in range(0, V, BLOCK):
        x = tl.load(lrow + start + cols, mask=start + cols < V, other=-float("inf"))
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0, tie_break_left=True)
        if m > best:
            best = m
            best_idx = start + i
        lo_key = tl.minimum(lo_key, tl.min(tl.where(start + cols < V, _key(x * inv_t), 0x7FFFFFFF), axis=0))
    z_max = best * inv_t
    max_key = _key(z_max)
    # the lower cut: min-p and top-k (largest key t with count(key >= t) >= k); invariant:
    # count(key >= lo) >= k > count(key >= hi), the range shrinking PROBES + 1 fold per pass
    cut = tl.full((), -0x7FFFFFFF - 2, tl.int64)
    if min_p > 0:
        cut = _key(z_max + tl.log(min_p))
    if (temp > 0) & (k > 0) & (k < V):
        lo = lo_key
        hi = max_key + 1
        while hi - lo > 1:
            t = _probes(lo, hi, PROBES)
            count = tl.zeros([PROBES], tl.int64)
            for start in range(0, V, BLOCK):
                ok = start + cols < V
                key = _key(tl.load(lrow + start + cols, mask=ok, other=-float("inf")) * inv_t)
                count += tl.sum(((key[None, :] >= t[:, None]) & ok[None, :]).to(tl.int64), axis=1)
            lo = tl.maximum(lo, tl.max(tl.where(count >= k, t, lo), axis=0))
            hi = tl.minimum(hi, tl.min(tl.where(count < k, t, hi), axis=0))
        cut = tl.maximum(cut, lo)
    cut = tl.minimum(cut, max_key)  # the largest logit always survives
    # top-p: the smallest t with mass(key > t) < p x mass(key >= cut), bisected over [cut - 1, max]
    if (temp > 0) & (top_p < 1):
        total = 0.0
        for start in range(0, V, BLOCK):
            z = tl.load(lrow + start + cols, mask=start + cols < V, other=-float("inf")) * inv_t
            total += tl.sum(tl.where(_key(z) >= cut, tl.exp(z - z_max), 0.0), axis=0)
        # invariant: mass(key > lo) >= p x total > mass(key > hi)
        lo = cut - 1
        hi = max_key
        while hi - lo > 1:
            t = _probes(lo, hi, PROBES)
            mass = tl.zeros([PROBES], tl.float32)
            for start in range(0, V, BLOCK):
                z = tl.load(lrow + start + cols, mask=start + cols < V, other=-float("inf")) * inv_t
                w = tl.exp(z - z_max)
                mass += tl.sum(tl.where(_key(z)[None, :] > t[:, None], w[None, :], 0.0), axis=1)
            below = mass < top_p * total
            hi = tl.minimum(hi, tl.min(tl.where(below, t, hi), axis=0))
            lo = tl.maximum(lo, tl.max(tl.where(below, lo, t), axis=0))
        cut = tl.maximum(cut, hi)
    # the race among survivors
    urow = U + row * stride_u
    win = -1.0
    win_idx = best_idx
    if temp > 0:
        for start in range(0, V, BLOCK):
            ok = start + cols < V
            z = tl.load(lrow + start + cols, mask=ok, other=-float("inf")) * inv_t
            u = tl.maximum(tl.load(urow + start + cols, mask=ok, other=0.5), 1.1754943508222875e-38)
            score = tl.where(ok & (_key(z) >= cut) & (z > -float("inf")), tl.exp(z - z_max) / -tl.log(u), -1.0)
            m = tl.max(score, axis=0)
            i = tl.argmax(score, axis=0, tie_break_left=True)
            if m > win:
                win = m
                win_idx = start + i
    tl.store(OUT + row, win_idx.to(tl.int64))  # type: ignore[attr-defined]  # a Triton tensor inside @jit


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        assert logits.stride(1) == 1 and noise.stride(1) == 1 and logits.dtype == torch.float32
        block = min(512, triton.next_power_of_2(vocab))  # x PROBES compares per chunk: 128 registers on sm_90
        _sample_kernel[(rows,)](logits, noise, temperature, top_k, top_p, min_p, out, vocab, logits.stride(0),
                                noise.stride(0), BLOCK=block, PROBES=16, num_warps=8)
    return out


# -- structured outputs: a grammar's allowed tokens as a bitmask -------------------------------
def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [R, V] float32; bitmask [R, W >= ceil(V / 32)] int32 where bit t % 32 of
    word t // 32 set means token t is allowed. Disallowed tokens get -inf (xgrammar's layout)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]  # [R, 32 W] -> [R, V]
    logits.masked_fill_(~allowed, float("-inf"))


@triton.jit
def _apply_bitmask_kernel(L, M, V, stride_l, stride_m, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < V
    words = tl.load(M + row * stride_m + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(L + row * stride_l + offs, float("-inf"), mask=in_vocab & (allowed == 0))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """As apply_token_bitmask_ref, one Triton program per row and 1024 tokens."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = 1024
    _apply_bitmask_kernel[(rows, triton.cdiv(vocab, block))](logits, bitmask, vocab, logits.stride(0),
                                                             bitmask.stride(0), BLOCK=block)
