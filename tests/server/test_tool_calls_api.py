"""Tool calls through the OpenAI API with the official SDK (issue 18 item 5): a named tool choice
and "required" are enforced by grammar and come back as tool_calls whose arguments validate
against the tool's schema, whole and streamed; "auto" reads the model's own calls with
--tool-call-parser; the chat template renders tools, earlier calls and tool results."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tandem.engine.arg_utils import DEMO_MODEL_DIR
from tests.helpers import start_server, stop_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'


@pytest.fixture(scope="module")
def server():
    # the bundled demo model: its tokenizer writes JSON in few tokens (the tiny presets' 512 do not)
    proc, base = start_server(DEMO_MODEL_DIR, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                              "--kv-cache-memory", "48MiB")
    yield base
    stop_server(proc)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


def _valid_calls(calls) -> list[str]:
    """Names of the calls, each checked: an id, a known tool, arguments valid for its schema."""
    for call in calls:
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in calls]


def _accumulate(stream) -> tuple[str, list[dict], str | None]:
    """A streamed choice 0 as a client rebuilds it: content, tool calls by index, finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = d.id or entry["id"]
            entry["name"] = (d.function.name if d.function else None) or entry["name"]
            entry["arguments"] += (d.function.arguments if d.function else None) or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_a_named_tool_choice_returns_that_call_whole_and_streamed(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                         max_tokens=40, temperature=0)
    message = out.choices[0].message
    assert _valid_calls(message.tool_calls) == ["get_weather"] and not message.content
    assert out.choices[0].finish_reason == "stop"  # as OpenAI's: a forced function ends with stop
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            max_tokens=40, temperature=0, stream=True)
    content, calls, finish = _accumulate(stream)
    assert content == "" and finish == "stop" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    assert calls[0]["arguments"] == message.tool_calls[0].function.arguments  # greedy: the same call


@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_calls_of_the_given_tools(client, parallel):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=parallel, max_tokens=80, temperature=1.0, seed=5, n=3)
    for choice in out.choices:
        names = _valid_calls(choice.message.tool_calls)
        assert names and (parallel or len(names) == 1)
        assert choice.finish_reason == "tool_calls"
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=parallel, max_tokens=80, temperature=0, stream=True)
    content, calls, finish = _accumulate(stream)
    assert calls and finish == "tool_calls" and content == ""
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_reads_the_models_own_call_with_the_hermes_parser(client):
    # the model is random: a one-choice constraint makes it write exactly what a Hermes model writes
    force = {"structured_outputs": {"choice": ["Checking. " + HERMES_CALL]}}
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200, extra_body=force)
    message = out.choices[0].message
    assert _valid_calls(message.tool_calls) == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo", "days": 2}
    assert message.content == "Checking. " and out.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                            extra_body=force, stream=True)
    content, calls, finish = _accumulate(stream)
    assert content == "Checking. " and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2})]


def test_auto_without_a_call_is_plain_content(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto",
                                         max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.tool_calls == [] and out.choices[0].finish_reason == "length"
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == plain.choices[0].message.content  # the same prompt, with tools


def test_the_template_renders_tools_earlier_calls_and_tool_results(client, server):
    history = ASK + [
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, 9 C"}]
    ids = httpx.post(f"{server}/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert json.dumps(WEATHER) in text and json.dumps(TIME) in text  # the tool definitions
    assert HERMES_CALL in text  # the assistant's earlier call, as the model writes calls
    assert "<|tool|>\nrain, 9 C" in text  # the tool's answer
    out = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                         max_tokens=3)
    assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"tools": [{"type": "retrieval"}]}, None),
    ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}, None),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "<|bos|>"}}], "tool_choice": "none"},
     "tools"),
])
def test_bad_tool_requests_are_400(server, body, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert httpx.get(f"{server}/health").status_code == 200
