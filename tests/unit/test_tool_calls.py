"""Tool-call extraction (issue 18 item 5): each parser reads its model's format into OpenAI tool
calls; streamed in any split, the content and calls equal the whole text's; text that is not a
call stays content; the required-choice schema admits exactly the calls it should."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.entrypoints.openai.tool_calls import (
    TOOL_CALL_PARSERS,
    JsonArrayCalls,
    NamedFunction,
    ToolCallExtractor,
    collect,
    required_schema,
)

WEATHER = {"city": "Paris", "unit": "c"}
TIME = {"tz": "UTC"}

# (parser, model output, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
               '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
     "Let me check.\n", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", "no calls here, only < and <tool text", "no calls here, only < and <tool text", []),
    ("hermes", "<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}', "", [("get_time", TIME)]),  # unclosed
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
                    '{"name": "get_time", "parameters": {"tz": "UTC"}}', "", [("get_weather", WEATHER),
                                                                            ("get_time", TIME)]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}', "", [("get_time", TIME)]),
    ("llama3_json", "The weather is {unknown}.", "The weather is {unknown}.", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                '{"name": "get_time", "arguments": {"tz": "UTC"}}]', "Sure. ", [("get_weather", WEATHER),
                                                                            ("get_time", TIME)]),
    ("mistral", "[TOOL_CALLS] not an array", "[TOOL_CALLS] not an array", []),
    ("mistral", "plain [TOOL answer", "plain [TOOL answer", []),
]


def _calls(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _streamed(extractor: ToolCallExtractor, pieces: list[str]) -> tuple[str, list[dict]]:
    content, deltas = "", []
    for piece in pieces:
        c, d = extractor.feed(piece)
        content, deltas = content + c, deltas + d
    c, d = extractor.finish()
    content, deltas = content + c, deltas + d
    merged: dict[int, dict] = {}
    for d in deltas:  # a client's accumulation of tool-call deltas (as the openai SDK does)
        entry = merged.setdefault(d["index"], {"function": {"name": None, "arguments": ""}})
        entry["function"]["name"] = d["function"].get("name") or entry["function"]["name"]
        entry["function"]["arguments"] += d["function"].get("arguments", "")
    return content, [merged[i] for i in sorted(merged)]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_each_parser_reads_its_format(parser, text, content, calls):
    got_content, got_calls = collect(TOOL_CALL_PARSERS[parser](), text)
    assert got_content == content
    assert _calls(got_calls) == calls
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_of_the_stream_gives_the_whole_texts_result(case, cuts):
    parser, text, content, calls = case
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got_content, got_calls = _streamed(TOOL_CALL_PARSERS[parser](), pieces)
    assert (got_content, _calls(got_calls)) == (content, calls)


def test_named_function_streams_its_arguments_as_fragments():
    pieces = ['{"city": ', '"Paris", "unit"', ': "c"}']
    content, calls = _streamed(NamedFunction("get_weather"), pieces)
    assert content == "" and _calls(calls) == [("get_weather", WEATHER)]
    header = NamedFunction("get_weather").feed(pieces[0])[1][0]  # the first delta names the call
    assert header["id"].startswith("chatcmpl-tool-") and header["function"] == {"name": "get_weather",
                                                                                  "arguments": pieces[0]}


def test_required_array_and_a_cut_off_output():
    required = lambda: JsonArrayCalls(("parameters",))  # noqa: E731
    text = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}, {"name": "get_time", ' \
           '"parameters": {"tz": "UTC"}}]'
    assert _calls(collect(required(), text)[1]) == [("get_weather", WEATHER), ("get_time", TIME)]
    cut = text[:40]  # max_tokens ran out inside the first call: the text comes back as content
    assert collect(required(), cut) == (cut, [])


def test_required_schema_admits_calls_of_the_given_tools_only():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}},
             {"name": "get_time"}]
    schema = required_schema(tools, parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "rm_rf", "parameters": {}}], [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):  # parallel_tool_calls false: one call at most
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, required_schema(tools, parallel=False))
