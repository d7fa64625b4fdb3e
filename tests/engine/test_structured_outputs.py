"""Structured outputs in the offline engine (xgrammar): every output parses and validates against
its schema, matches its regex, is one of its choices or derives from its grammar, with greedy and
seeded sampling, n > 1, chunked prefill, preemption and prefix caching; a constraint that does not
compile is a ParamError naming structured_outputs."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tandem import LLM, SamplingParams, StructuredOutputsParams
from tandem.engine.arg_utils import DEMO_MODEL_DIR
from tandem.sampling_params import ParamError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "admin": {"type": "boolean"}},
     "required": ["name", "age", "admin"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": "string", "maxLength": 5}}, "required": ["point"], "additionalProperties": False},
]
PROMPTS = ["def parse(line):", "import json\n", "The answer is"]


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM(model=str(DEMO_MODEL_DIR), kv_cache_memory="64MiB")


def _params(max_tokens: int = 96, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["flat", "enums-arrays", "nested"])
def test_every_output_validates_against_its_schema(demo, schema):
    constraint = StructuredOutputsParams(json=schema)
    params = [_params(temperature=0, structured_outputs=constraint),
              _params(temperature=1.0, seed=7, n=2, structured_outputs=constraint)]
    outs = demo.generate([PROMPTS[0], PROMPTS[1]], params, use_tqdm=False)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


def test_json_object_regex_choice_and_grammar(demo):
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    constraints = [StructuredOutputsParams(json_object=True), StructuredOutputsParams(regex=r"[a-z]{3}-[0-9]{2,4}"),
                   StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]),
                   StructuredOutputsParams(grammar=grammar)]
    outs = demo.generate([PROMPTS[2]] * 4, [_params(temperature=0.7, seed=3, structured_outputs=c)
                                            for c in constraints], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[1:]), texts
    # any object: its strings are unbounded, so the model may run out of tokens inside one
    assert isinstance(json.loads(texts[0]), dict) if outs[0].outputs[0].finish_reason == "stop" \
        else texts[0].startswith("{")
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", texts[1])
    assert texts[2] in ("alpha", "beta", "gamma delta")
    assert re.fullmatch(r"\(([0-9]|[1-9][0-9])(,([0-9]|[1-9][0-9]))*\)", texts[3]), texts[3]


def test_constrained_and_free_requests_share_a_batch(demo):
    free = demo.generate([PROMPTS[0]], _params(16, temperature=0), use_tqdm=False)[0].outputs[0].text
    outs = demo.generate([PROMPTS[0], PROMPTS[0]], [_params(16, temperature=0),
                                                   _params(temperature=0, structured_outputs=StructuredOutputsParams(
                                                       choice=["yes", "no"]))], use_tqdm=False)
    assert outs[0].outputs[0].text == free  # the other row's mask does not leak into this one
    assert outs[1].outputs[0].text in ("yes", "no")


def test_chunked_prefill_preemption_and_prefix_caching_keep_outputs_valid(model_dirs):
    """A tiny KV cache and a small token budget: long prompts are prefilled in chunks, requests
    are preempted and recomputed, and a repeated prompt hits the prefix cache."""
    llm = LLM(model=str(model_dirs["llama3-gqa"]), kv_cache_memory="96KiB", max_num_batched_tokens=32,
              max_num_seqs=4)
    schema = SCHEMAS[1]
    prompts = [{"prompt_token_ids": [(i * 7 + k) % 250 + 3 for i in range(70)]} for k in range(3)] * 2
    params = _params(64, temperature=1.0, seed=11, structured_outputs=StructuredOutputsParams(json=schema))
    outs = llm.generate(prompts, [params] * 6, use_tqdm=False)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0, "the cache was meant to force preemptions"
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    llm.llm_engine.assert_idle()


def test_a_constraint_that_does_not_compile_names_the_field(demo):
    for bad in (StructuredOutputsParams(json='{"type": "object", "properties": 5}'),
                StructuredOutputsParams(regex="(unclosed"), StructuredOutputsParams(grammar="root ::= ")):
        with pytest.raises(ParamError) as err:
            demo.generate(["x"], _params(8, structured_outputs=bad), use_tqdm=False)
        assert err.value.param == "structured_outputs"
    with pytest.raises(ParamError):
        StructuredOutputsParams(json={"type": "object"}, regex="a")  # exactly one constraint
    demo.llm_engine.assert_idle()


def test_async_scheduling_gives_the_outputs_of_sync_scheduling(model_dirs):
    """With a grammar in the engine, steps are not overlapped (its next mask needs the token just
    sampled); the outputs, constrained and free in one batch, are those of synchronous scheduling."""
    prompts = ["def f(x):", "import os", "class A:"] * 2
    constraint = StructuredOutputsParams(json=SCHEMAS[1])
    params = [_params(24, temperature=0, ignore_eos=True), _params(temperature=1.0, seed=4, structured_outputs=constraint),
              _params(temperature=0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))] * 2
    texts = {}
    for async_scheduling in (False, True):
        llm = LLM(model=str(model_dirs["llama3-gqa"]), kv_cache_memory="8MiB", async_scheduling=async_scheduling)
        texts[async_scheduling] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        free_only = llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].outputs[0].text  # overlapped again
        assert free_only == texts[async_scheduling][0]
        llm.llm_engine.assert_idle()
    assert texts[True] == texts[False]
    for text in texts[True][1::3]:
        jsonschema.validate(json.loads(text), SCHEMAS[1])


@pytest.mark.parametrize("method", ["ngram", "eagle"])
def test_speculation_gives_the_outputs_without_it(demo, method):
    """Drafts for constrained requests: only those their grammar accepts are proposed, each of the
    1 + k verified rows is masked by the grammar after the drafts before it, and the grammar
    advances by every token a step gives. Greedy outputs equal those without speculation."""
    config = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False}
              if method == "ngram" else
              {"method": "eagle", "model": str(DEMO_MODEL_DIR.parent / "tandem-demo-eagle"),
               "num_speculative_tokens": 3, "adaptive": False})
    spec = LLM(model=str(DEMO_MODEL_DIR), kv_cache_memory="64MiB", speculative_config=config)
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    constraints = [StructuredOutputsParams(json=SCHEMAS[1]), StructuredOutputsParams(regex=r"([a-c]{2},){3,12}"),
                   StructuredOutputsParams(grammar=grammar), StructuredOutputsParams(choice=["alpha", "beta gamma"]),
                   None]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[0], PROMPTS[0]]
    params = [_params(64, temperature=0, structured_outputs=c) for c in constraints]
    want, got = (llm.generate(prompts, params, use_tqdm=False) for llm in (demo, spec))
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == \
        [(o.outputs[0].text, o.outputs[0].finish_reason) for o in want]
    assert sum(o.metrics["spec_num_drafts"] for o in got[:4]) > 0  # the constrained requests speculated
    spec.llm_engine.assert_idle()
