"""Model names as vLLM's server has them: the model argument as given by default, several
--served-model-name values (the first reported), /v1/models/{id}, and OpenAI-shaped 404s."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import start_server, stop_server


@pytest.fixture(scope="module")
def default_named(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"], served_names=())
    yield base, str(model_dirs["llama3-gqa"])
    stop_server(proc)


@pytest.fixture(scope="module")
def two_named(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"], served_names=("first-name", "org/second-name"))
    yield base
    stop_server(proc)


def test_the_model_argument_as_given_is_the_default_name(default_named):
    base, path = default_named
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [path]
    out = client.completions.create(model=path, prompt="hello", max_tokens=2)
    assert out.model == path and out.usage.completion_tokens == 2
    card = client.models.retrieve(path)
    assert card.id == path and card.model_extra["root"] == path
    basename = path.rstrip("/").rsplit("/", 1)[-1]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model=basename, prompt="hello", max_tokens=2)
    assert err.value.code == "model_not_found"


def test_every_served_name_is_accepted_and_the_first_reported(two_named):
    client = openai.OpenAI(base_url=f"{two_named}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["first-name", "org/second-name"]
    chat = client.chat.completions.create(model="org/second-name", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert chat.model == "first-name"
    assert client.models.retrieve("org/second-name").id == "org/second-name"  # a name with a slash
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"


def test_unknown_routes_answer_in_openai_error_shape(two_named):
    r = httpx.post(f"{two_named}/v1/no-such-endpoint", json={})
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
