"""Structured outputs over HTTP with the openai SDK: OpenAI's response_format (json_object,
json_schema), vLLM's structured_outputs and guided_* fields, streamed and not, n > 1; a schema
that does not compile is a 400 naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tandem.engine.arg_utils import DEMO_MODEL_DIR
from tests.helpers import start_server, stop_server

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima", "Oslo"]},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
                                           "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def client():
    proc, base = start_server(DEMO_MODEL_DIR)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    stop_server(proc)


def test_response_format_json_schema_on_chat(client):
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=80, n=2, temperature=0.9, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_output_validates(client):
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=80, stream=True, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_fields_on_completions(client):
    choice = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=10, temperature=1.0, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert choice.choices[0].text in ("left", "right")
    regex = client.completions.create(model="tiny", prompt="An id:", max_tokens=20, temperature=1.0, seed=2,
                                      extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", regex.choices[0].text)
    guided = client.completions.create(model="tiny", prompt="{", max_tokens=80, temperature=0,
                                       extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(guided.choices[0].text), SCHEMA)


def test_a_schema_that_does_not_compile_is_a_400_naming_its_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}})
    assert err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"guided_regex": "(open"})
    assert err.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as err:  # one constraint at a time
        client.completions.create(model="tiny", prompt="x", max_tokens=8,
                                  extra_body={"guided_regex": "a+", "guided_choice": ["a"]})
    assert err.value.body["param"] == "guided_choice"
    # the server still serves
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
