"""Nothing accepted is silently ignored: a request field tandem does not implement is a 400 naming
it, unless its value asks for nothing; vLLM's stream_options.continuous_usage_stats and
stop_token_ids work."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


CHAT = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("endpoint,field,value", [
    ("completions", "best_of", 2),
    ("completions", "suffix", " the end"),
    ("completions", "some_future_field", 1),
    ("completions", "use_beam_search", True),
    ("chat", "guided_whitespace_pattern", " "),
    ("completions", "tools", [TOOL]),
    ("chat", "functions", [TOOL["function"]]),
])
def test_an_unsupported_field_is_a_400_that_names_it(client, endpoint, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "completions":
            client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={field: value})
        else:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field and err.value.body["code"] == "unsupported_parameter"
    assert field in err.value.body["message"]


@pytest.mark.parametrize("field,value", [("best_of", 1), ("suffix", ""), ("some_future_field", None),
                                         ("response_format", {"type": "text"}), ("tool_choice", "none"),
                                         ("tools", [])])
def test_a_field_sent_with_the_value_that_asks_nothing_passes(client, field, value):
    if field in ("response_format", "tool_choice", "tools"):
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={field: value})
    else:
        out = client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={field: value})
    assert out.usage.completion_tokens == 2


def test_auto_tool_choice_needs_a_server_started_with_a_parser(client):
    with pytest.raises(openai.BadRequestError) as err:  # tools default to "auto", as OpenAI's
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tools=[TOOL])  # type: ignore[list-item]
    assert err.value.body["param"] == "tool_choice" and "--tool-call-parser" in err.value.body["message"]
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tools=[TOOL],  # type: ignore[list-item]
                                         tool_choice={"type": "function", "function": {"name": "f"}})
    assert out.choices[0].message.tool_calls[0].function.name == "f"  # named choices need no parser


def test_unknown_stream_options_are_refused(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, stream=True,
                                  stream_options={"include_usage": True, "per_token_carbon": True})  # type: ignore[typeddict-unknown-key]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats_puts_usage_so_far_in_every_chunk(client, endpoint):
    options = {"include_usage": True, "continuous_usage_stats": True}
    if endpoint == "completions":
        stream = client.completions.create(model="tiny", prompt="hello", max_tokens=6, stream=True,
                                           stream_options=options, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    else:
        stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, stream=True,
                                                stream_options=options,  # type: ignore[arg-type]
                                                extra_body={"ignore_eos": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices and (endpoint == "completions" or c.choices[0].delta.content
                                                        or c.choices[0].finish_reason)]
    assert with_choices and all(c.usage is not None for c in with_choices)
    so_far = [c.usage.completion_tokens for c in with_choices]
    assert so_far == sorted(so_far) and so_far[-1] == 6
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in with_choices)


def test_stop_token_ids_end_the_output_on_that_token(client):
    forced = 77  # logit_bias makes it the greedy choice at every step
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0,
                                    logit_bias={str(forced): 100},
                                    extra_body={"stop_token_ids": [forced], "ignore_eos": True})
    choice = out.choices[0]
    assert out.usage.completion_tokens == 1
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == forced
