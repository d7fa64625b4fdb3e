"""Sampler distributions and filters, directly on logits."""

import math

import pytest
import torch

from tandem.kernels import sampling
from tandem.runner.sampler import Sampler
from tandem.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))


def _ids(sampler: Sampler, logits: torch.Tensor, states: list) -> list[int]:
    return sampler.sample_on_device(logits, states)[0].tolist()


def draw(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(vocab_size=4, seed=0)
    states = [sampler.make_state(params, [0]) for _ in range(n)]
    return torch.tensor(_ids(sampler, LOGITS.expand(n, 4).clone(), states))


def freqs(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=4).float() / len(tokens)


def test_temperature_one_samples_the_softmax():
    torch.testing.assert_close(freqs(draw(SamplingParams(temperature=1.0))), LOGITS.exp()[0], atol=0.03, rtol=0)


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(draw(SamplingParams(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.6)).tolist()) == {0, 1}  # 0.5 < 0.6 needs token 1
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.4)).tolist()) == {0, 1}  # p >= 0.2


def test_low_temperature_sharpens():
    assert freqs(draw(SamplingParams(temperature=0.2)))[0] > 0.9


def test_seeded_rows_do_not_depend_on_their_neighbours():
    sampler = Sampler(vocab_size=4, seed=0)
    logits = LOGITS.expand(3, 4).clone()
    a = [sampler.make_state(SamplingParams(temperature=1.0, seed=s), [0]) for s in (1, 2, 3)]
    first = [_ids(sampler, logits, a) for _ in range(20)]
    b = [sampler.make_state(SamplingParams(temperature=1.0, seed=s), [0]) for s in (3, 1)]
    second = [_ids(sampler, logits[:2], b) for _ in range(20)]
    assert [row[2] for row in first] == [row[0] for row in second]
    assert [row[0] for row in first] == [row[1] for row in second]


def test_penalties_push_seen_tokens_down():
    sampler = Sampler(vocab_size=4, seed=0)
    state = sampler.make_state(SamplingParams(temperature=0, presence_penalty=2.0), [3])
    state.output_token_ids = [0]
    assert _ids(sampler, LOGITS.clone(), [state]) == [1]


def _survivors(z: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The documented filter semantics, spelled out one token at a time."""
    z_max = max(z)
    alive = {i for i, v in enumerate(z) if v > -math.inf and (min_p == 0 or v >= z_max + math.log(min_p))}
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        alive = {i for i in alive if z[i] >= kth}
    alive.add(z.index(z_max))
    if top_p < 1:
        mass = {i: math.exp(z[i] - z_max) for i in alive}
        total = sum(mass.values())
        alive = {i for i in alive if sum(m for j, m in mass.items() if z[j] > z[i]) < top_p * total}
    return alive


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 3, 1.0, 0.0), (0.8, 0, 0.7, 0.0),
                                                           (1.5, 0, 1.0, 0.2), (1.0, 5, 0.9, 0.05),
                                                           (1.0, 2, 1.0, 0.0)])
def test_filters_keep_exactly_the_documented_support_and_renormalise(temperature, top_k, top_p, min_p):
    """Tied logits included (top-k keeps every tie at its cut); frequencies follow the renormalised
    distribution of the survivors."""
    logits = torch.tensor([2.0, 1.0, 1.0, 0.5, 0.0, -1.0, -1.0, -3.0])
    n = 20000
    z = (logits / temperature).tolist()
    alive = _survivors(z, top_k, top_p, min_p)
    rows = logits.expand(n, -1).contiguous()
    cols = [torch.full((n,), v) for v in (temperature, top_p, min_p)]
    got = sampling.sample_ref(rows, cols[0], torch.full((n,), top_k, dtype=torch.int32), cols[1], cols[2],
                              torch.rand(rows.shape, generator=torch.Generator().manual_seed(5)))
    assert set(got.tolist()) == alive
    weights = torch.tensor([math.exp(z[i]) if i in alive else 0.0 for i in range(len(z))])
    expected = weights / weights.sum()
    torch.testing.assert_close(torch.bincount(got, minlength=len(z)).float() / n, expected, atol=0.015, rtol=0)


def test_the_triton_sampler_draws_what_the_reference_draws():
    """Whole Sampler (penalties, seeded and unseeded rows, logprobs) with either sample_fn."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2)) * 2
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5, seed=1),
              SamplingParams(temperature=0.9, top_p=0.8, logprobs=2), SamplingParams(temperature=1.0, min_p=0.1),
              SamplingParams(temperature=1.2, repetition_penalty=1.3, seed=7), SamplingParams(temperature=1.0)]
    outs = []
    for fn in (sampling.sample_ref, sampling.sample):
        sampler = Sampler(vocab_size=50, seed=3, sample_fn=fn)
        states = [sampler.make_state(p, [1, 2, 3]) for p in params]
        outs.append([_ids(sampler, logits, states) for _ in range(4)])
    assert outs[0] == outs[1]
