"""Sampler distributions and filters, directly on logits."""

import torch

from tandem.runner.sampler import Sampler
from tandem.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))


def draw(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(vocab_size=4, seed=0)
    states = [sampler.make_state(params, [0]) for _ in range(n)]
    return torch.tensor(sampler(LOGITS.expand(n, 4).clone(), states).token_ids)


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
    first = [sampler(logits, a).token_ids for _ in range(20)]
    b = [sampler.make_state(SamplingParams(temperature=1.0, seed=s), [0]) for s in (3, 1)]
    second = [sampler(logits[:2], b).token_ids for _ in range(20)]
    assert [row[2] for row in first] == [row[0] for row in second]
    assert [row[0] for row in first] == [row[1] for row in second]


def test_penalties_push_seen_tokens_down():
    sampler = Sampler(vocab_size=4, seed=0)
    state = sampler.make_state(SamplingParams(temperature=0, presence_penalty=2.0), [3])
    state.output_token_ids = [0]
    assert sampler(LOGITS.clone(), [state]).token_ids == [1]
