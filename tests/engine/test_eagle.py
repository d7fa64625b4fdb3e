"""Speculative decoding with an EAGLE head (methods ``eagle`` and ``eagle3``): outputs equal those without
speculation; the head's drafts equal what transformers' modules compute from the whole context
(its paged KV, the pending target features and the scratch positions are kept right); the bundled
head proposes well for the demo model; a head that does not fit is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.arg_utils import DEMO_MODEL_DIR, EngineArgs
from tandem.runner.eagle_drafter import EagleDrafter
from tandem.testing import (
    build_tiny_eagle3_head,
    build_tiny_eagle_head,
    build_tiny_model,
    load_eagle3_head_hf,
    load_eagle_head_hf,
)

CHUNKED = {"max_num_batched_tokens": 16, "num_gpu_blocks_override": 14, "block_size": 4, "max_num_seqs": 4}


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(n)] for i, n in enumerate((9, 23, 14, 31))]


def _tokens(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs]


AUX_LAYERS = [0, 1, 1]  # the tiny targets have two layers (vLLM's default needs at least four)


@pytest.fixture(scope="module")
def heads(model_dirs, tmp_path_factory) -> dict:
    """(method, preset) -> a random head for that target."""
    built = {}
    for name in ("llama3-gqa", "qwen3-qknorm"):
        built["eagle", name] = build_tiny_eagle_head(tmp_path_factory.mktemp(f"eagle-{name}"), model_dirs[name])
        built["eagle3", name] = build_tiny_eagle3_head(tmp_path_factory.mktemp(f"eagle3-{name}"), model_dirs[name],
                                                       AUX_LAYERS, draft_vocab_size=200)
    return built


def _eagle(head, method: str = "eagle", **kw) -> dict:
    return {"method": method, "model": str(head), "num_speculative_tokens": 3, "adaptive": False, **kw}


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
@pytest.mark.parametrize("preset", ["llama3-gqa", "qwen3-qknorm"])
def test_greedy_equal_with_chunked_prefill_preemption_n_prefix_hits_and_offload(make_llm, heads, preset, method):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    want = _tokens(make_llm(preset, **CHUNKED), params)
    config = _eagle(heads[method, preset], method)
    spec = make_llm(preset, speculative_config=config, **CHUNKED)
    assert _tokens(spec, params) == want
    assert _tokens(spec, params) == want  # again: prefix hits
    assert spec.llm_engine.scheduler.num_preemptions > 0 and spec.llm_engine.kv.stats.hits > 0
    assert spec.llm_engine.scheduler.planner.stats.num_draft_tokens > 0
    offload = make_llm(preset, speculative_config=config, kv_offloading_size=0.01, **CHUNKED)
    assert _tokens(offload, params) == want
    assert _tokens(offload, params) == want


def _reference_drafts(target, head, tokens: list[int], k: int) -> list[int]:
    """The head run from scratch over the whole context: features of the target at positions
    0..n-2 with tokens 1..n-1, then each draft at the next position on the head's own prediction."""
    ids = torch.tensor([tokens])
    embed = target.model.embed_tokens
    out = target.model(input_ids=ids[:, :-1], output_hidden_states=True)
    if hasattr(head, "draft_tokens"):  # EAGLE-3: the residual streams entering the aux layers, through fc
        features = head.fc(torch.cat([out.hidden_states[i] for i in AUX_LAYERS], dim=-1))
    else:
        features = out.last_hidden_state
    inputs = embed(ids[:, 1:])
    drafts: list[int] = []
    for _ in range(k):
        predicted = head(inputs, features)[:, -1:]
        best = head.draft_tokens(predicted) if hasattr(head, "draft_tokens") else target.lm_head(predicted).argmax(-1)
        drafts.append(int(best[0, -1]))
        inputs = torch.cat([inputs, embed(torch.tensor([[drafts[-1]]]))], dim=1)
        features = torch.cat([features, predicted], dim=1)
    return drafts


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
@pytest.mark.parametrize("sched", [CHUNKED, {"max_num_batched_tokens": 512}], ids=["chunked-preempted", "whole"])
def test_drafts_equal_the_head_run_over_the_whole_context(make_llm, model_dirs, heads, sched, method):
    """Every proposal the engine made (batched, chunked prefill, preemption) equals the head's output
    computed without a cache by transformers' modules. Prefix caching is off: a prefix hit reuses the
    head's KV as the first request left it, which no from-scratch run reproduces."""
    from transformers import AutoModelForCausalLM

    spec = make_llm(speculative_config=_eagle(heads[method, "llama3-gqa"], method), enable_prefix_caching=False,
                    **sched)
    drafter = spec.llm_engine.runner.drafter
    assert isinstance(drafter, EagleDrafter)
    recorded: list[tuple[list[int], list[int]]] = []
    propose = drafter.propose

    def recording(chunks, tokens_of, sampled, target_hidden):
        proposals = propose(chunks, tokens_of, sampled, target_hidden)
        for rid, (n, drafts) in proposals.items():
            assert n == len(tokens_of(rid))
            recorded.append((list(tokens_of(rid)), drafts))
        return proposals

    drafter.propose = recording
    _tokens(spec, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert len(recorded) > 20
    if sched is CHUNKED:
        assert spec.llm_engine.scheduler.num_preemptions > 0
    target = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama3-gqa"]), dtype=torch.float32).eval()
    load = load_eagle3_head_hf if method == "eagle3" else load_eagle_head_hf
    head = load(heads[method, "llama3-gqa"], model_dirs["llama3-gqa"])
    with torch.no_grad():
        matches = [_reference_drafts(target, head, tokens, len(drafts)) == drafts for tokens, drafts in recorded]
    # exact up to the odd near-tie of two logits that summation order can flip
    assert sum(matches) >= len(matches) - max(1, len(matches) // 50), f"{sum(matches)} of {len(matches)} match"


def test_a_request_backed_off_catches_up_in_one_forward_when_it_proposes(make_llm, model_dirs, heads):
    """While speculation is backed off the head does not run; the first proposal after the pause
    computes every position since (the prompt and the tokens decoded meanwhile) in one forward."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = [{"prompt_token_ids": _prompts()[1]}]
    want = make_llm().generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    spec = make_llm(speculative_config=_eagle(heads["eagle", "llama3-gqa"], adaptive=True))
    drafter, steps, paused = spec.llm_engine.runner.drafter, [], 20
    spec.llm_engine.scheduler.planner.speculates_next = lambda batch_size: len(steps) > paused
    computed: list[list[int]] = []
    compute, launch = drafter._compute, spec.llm_engine.runner.launch

    def counting_launch(out):
        steps.append(1)
        return launch(out)

    def recording(due):
        computed.append([len(c.token_ids) for c, _ in due])
        return compute(due)

    spec.llm_engine.runner.launch, drafter._compute = counting_launch, recording
    assert spec.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want
    # the first proposal is at step paused + 2 (the prompt's step, then paused + 1 decodes): every
    # prompt position, and one per decode step
    assert computed[0] == [len(_prompts()[1]) + paused + 1]
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0


@pytest.mark.parametrize("method", ["ngram", "eagle", "eagle3"])
def test_speculation_with_async_scheduling(make_llm, heads, method):
    """Async scheduling with the adaptive back-off: steps that verify or propose drafts run
    synchronously, the others overlap (a step still in flight when step() returns), and the tokens
    equal those of a synchronous engine without speculation."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    want = _tokens(make_llm(**CHUNKED), params)
    config = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1} if method == "ngram"
              else _eagle(heads[method, "llama3-gqa"], method, adaptive=True))
    spec = make_llm(speculative_config=config, async_scheduling=True, **CHUNKED)
    core, overlapped = spec.llm_engine.core, []
    step = core.step

    def recording_step():
        outputs = step()
        overlapped.append(core._in_flight is not None)
        return outputs

    core.step = recording_step
    assert _tokens(spec, params) == want
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0 and any(overlapped)


@pytest.mark.parametrize("method", ["ngram", "eagle", "eagle3"])
def test_speculation_with_the_decode_graph_path(make_llm, heads, method):
    """Decode steps without drafts replay the decode graphs (on a CPU: the same padded static
    buffers, run eagerly), steps that verify drafts run eagerly, and the EAGLE head reads the graph
    path's hidden states: the tokens equal an engine without either. EAGLE-3 turns the graphs off
    (a replay would not refresh the residual streams it reads)."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _tokens(make_llm(), params)
    config = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1} if method == "ngram"
              else _eagle(heads[method, "llama3-gqa"], method, adaptive=True))
    spec = make_llm(speculative_config=config, cuda_graph_sizes=[1, 2, 4, 8])
    assert _tokens(spec, params) == want
    assert spec.llm_engine.scheduler.planner.stats.num_drafts > 0
    graphs = spec.llm_engine.runner.decode_graphs
    if method == "eagle3":
        assert graphs is None
    else:
        assert graphs is not None and graphs.steps > 0


@pytest.mark.parametrize(("method", "min_acceptance"), [("eagle", 1.8), ("eagle3", 1.5)])
def test_the_bundled_head_proposes_for_the_demo_model(method, min_acceptance):
    """models/tandem-demo-eagle and -eagle3 (scripts/train_eagle.py) on held-out code: the same
    tokens as without speculation, and most steps accept drafts (the cards say 2.88 and 2.26 tokens
    per step over eight longer windows)."""
    ids_text = (DEMO_MODEL_DIR / "heldout-sample.txt").read_text()
    engines = [LLM(model=str(DEMO_MODEL_DIR), kv_cache_memory="16MiB", speculative_config=cfg)
               for cfg in (None, _eagle(DEMO_MODEL_DIR.parent / f"tandem-demo-{method}", method))]
    ids = engines[0].get_tokenizer().encode(ids_text)
    prompts = [{"prompt_token_ids": ids[i * 300:i * 300 + 128]} for i in range(2)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain, spec = ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] for llm in engines)
    assert spec == plain
    assert engines[1].llm_engine.scheduler.planner.stats.acceptance_length > min_acceptance
    for llm in engines:
        llm.llm_engine.assert_idle()


def test_eagle_errors_name_the_problem(make_llm, model_dirs, heads, tmp_path):
    with pytest.raises(ValueError, match="'eagle' needs model"):
        EngineArgs(speculative_config={"method": "eagle"})
    with pytest.raises(ValueError, match="'mtp' is not supported yet"):
        EngineArgs(speculative_config={"method": "mtp", "model": "x"})
    with pytest.raises(ValueError, match="is an EAGLE-3 head: use method eagle3"):
        make_llm(speculative_config=_eagle(heads["eagle3", "llama3-gqa"]))
    with pytest.raises(ValueError, match="is an EAGLE-1 head: use method eagle$"):
        make_llm(speculative_config=_eagle(heads["eagle", "llama3-gqa"], "eagle3"))
    default_layers = build_tiny_eagle3_head(tmp_path / "e3", model_dirs["llama3-gqa"], AUX_LAYERS, 200)
    config = json.loads((default_layers / "config.json").read_text())
    del config["eagle_config"]  # vLLM's default layers (2, 1, -1) do not exist in a 2-layer target
    (default_layers / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"aux hidden state layers \[2, 1, -1\] are not layers"):
        make_llm(speculative_config=_eagle(default_layers, "eagle3"))
    with pytest.raises(ValueError, match="not an EAGLE head: it has no fc.weight"):
        make_llm(speculative_config=_eagle(model_dirs["llama3-gqa"]))
    narrow = build_tiny_model(tmp_path / "narrow", family="llama", hidden_size=32, num_attention_heads=2)
    with pytest.raises(ValueError, match="must be trained for its target"):
        make_llm(speculative_config=_eagle(build_tiny_eagle_head(tmp_path / "narrow-head", narrow)))
