"""Echo and prompt logprobs as vLLM answers them (what lm-eval's loglikelihood requests read): the
prompt as sent, then the generation; logprobs of every prompt token (the first null) equal to
transformers' on the same model; max_tokens 0 with echo; vLLM's prompt_logprobs field."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.helpers import hf_model, start_server, stop_server

PRESET = "llama3-gqa"


@pytest.fixture(scope="module")
def server(model_dirs):
    proc, base = start_server(model_dirs[PRESET])
    yield base, str(model_dirs[PRESET])
    stop_server(proc)


def _hf_prompt_logprobs(path: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers."""
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _ids(base: str, text: str) -> list[int]:
    return httpx.post(f"{base}/tokenize", json={"prompt": text}).json()["tokens"]


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_with_logprobs_scores_every_prompt_token_like_transformers(server, max_tokens):
    base, path = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    prompt = "the quick brown fox jumps over the lazy dog"
    ids = _ids(base, prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1,
                                    temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)  # the prompt as sent: no BOS text in front
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) + max_tokens == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = _hf_prompt_logprobs(path, ids)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-3)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert choice.text == prompt and choice.finish_reason == "length"


def test_echo_of_token_ids_returns_their_text(server):
    base, _ = server
    ids = _ids(base, "hello there")
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": ids, "echo": True, "max_tokens": 0})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == httpx.post(f"{base}/detokenize", json={"tokens": ids}).json()["prompt"]


def test_streamed_echo_sends_the_prompt_first_and_equals_the_whole_answer(server):
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    prompt = "one two three"
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_max_tokens_zero_needs_echo(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400


def test_prompt_logprobs_field_on_completions_and_chat(server):
    base, path = server
    prompt = "a b c d e"
    ids = _ids(base, prompt)
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1,
                                                   "prompt_logprobs": 2}).json()
    scored = r["choices"][0]["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    chosen = [scored[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
    assert chosen == pytest.approx(_hf_prompt_logprobs(path, ids), abs=1e-3)
    assert all(len(entry) >= 2 for entry in scored[1:])  # the prompt token and its top 2 (they may coincide)
    chat = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "prompt_logprobs": 0,
                                                           "messages": [{"role": "user", "content": prompt}]}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    streamed = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": prompt, "stream": True,
                                                          "prompt_logprobs": 1})
    assert streamed.status_code == 400
