"""Speculative decoding building blocks: rejection sampling keeps the target distribution exactly
(chi-square over a small vocabulary with a fixed seed; a sampler that ignores the draft's
probabilities fails the same test), greedy rows accept the argmax prefix, and the n-gram index
proposes what a brute-force scan finds."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.spec_decode.ngram import NgramIndex
from tandem.spec_decode.rejection import PAD, rejection_sample

CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _trials(p: torch.Tensor, q: torch.Tensor, n: int, seed: int, tell_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent rounds with k = 2 drafts drawn from q; counts of the first emitted token and
    of the second (where one was emitted)."""
    g = torch.Generator().manual_seed(seed)
    k, vocab = q.shape[0], q.shape[1]
    draft = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], 1)
    target = p.expand(n, k + 1, vocab)
    tokens, emitted = rejection_sample(target, draft, q.expand(n, k, vocab) if tell_q else None,
                                       torch.zeros(n, dtype=torch.bool), g)
    first = torch.bincount(tokens[:, 0], minlength=vocab).float()
    second = torch.bincount(tokens[emitted >= 2, 1], minlength=vocab).float()
    return first, second


def test_sampled_outputs_follow_the_target_distribution_exactly():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
    first, second = _trials(p, q, 40_000, seed=1, tell_q=True)
    assert _chi2(first, p[0]) < CHI2_DF4_P001
    assert _chi2(second, p[1]) < CHI2_DF4_P001
    assert second.sum() > 10_000  # enough second tokens to judge


def test_a_sampler_that_redraws_from_the_target_on_rejection_fails_the_same_test():
    """The classic bug: on a rejection, draw from p instead of the residual max(0, p - q). The same
    chi-square test catches it, so the tests above can fail."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1])
    g = torch.Generator().manual_seed(1)
    n = 40_000
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    accept = torch.rand(n, generator=g) * q[draft] < p[draft]
    redrawn = torch.multinomial(p, n, replacement=True, generator=g)
    first = torch.bincount(torch.where(accept, draft, redrawn), minlength=5).float()
    assert _chi2(first, p) > CHI2_DF4_P001


def test_ngram_style_drafts_with_certainty_keep_the_target_distribution():
    """q = 1 on the proposed token (an n-gram proposer): always the same draft, still exact."""
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    n = 40_000
    g = torch.Generator().manual_seed(2)
    draft = torch.tensor([[1, 3]]).expand(n, 2)
    tokens, emitted = rejection_sample(p.expand(n, 3, 5), draft, None, torch.zeros(n, dtype=torch.bool), g)
    assert _chi2(torch.bincount(tokens[:, 0], minlength=5).float(), p[0]) < CHI2_DF4_P001
    assert _chi2(torch.bincount(tokens[emitted >= 2, 1], minlength=5).float(), p[1]) < CHI2_DF4_P001


def test_greedy_rows_accept_the_argmax_prefix_and_emit_the_argmax():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]],
                           [[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])
    probs = torch.softmax(logits, -1)
    drafts = torch.tensor([[1, 0], [1, 2]])  # row 0: both right; row 1: the second is wrong
    tokens, emitted = rejection_sample(probs, drafts, None, torch.ones(2, dtype=torch.bool))
    assert tokens.tolist() == [[1, 0, 2], [1, 0, PAD]]
    assert emitted.tolist() == [3, 2]


def _brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    size = len(tokens)
    for n in range(min(max_n, size), min_n - 1, -1):
        suffix = tokens[size - n:]
        for end in range(size - 1, n - 1, -1):  # latest earlier occurrence, ending before the last token
            if tokens[end - n:end] == suffix:
                return tokens[end:end + k]
    return []


@pytest.mark.parametrize("seed", range(5))
def test_ngram_index_proposes_what_a_scan_finds(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(6) for _ in range(300)]
    index = NgramIndex(1, 4)
    for i, t in enumerate(tokens):
        index.extend([t])
        if i % 7 == 0:
            assert index.propose(3) == _brute_force(tokens[: i + 1], 1, 4, 3), i


def test_ngram_index_copies_a_repeated_file():
    text = list(range(100, 160))
    index = NgramIndex(2, 5)
    index.extend(text + text[:10])  # a file, then the start of the same file
    assert index.propose(5) == text[10:15]
