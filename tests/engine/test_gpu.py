"""Checks only a CUDA GPU can run (skipped elsewhere; scripts/gpu_check.sh runs them on the H200):
the Triton backend with decode CUDA graphs against the eager torch backend and transformers, and
the host syncs of a decode step."""

from __future__ import annotations

import warnings

import pytest
import torch

from tandem import SamplingParams
from tests.helpers import hf_model, prompts_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_triton_graphs_greedy_equals_eager_torch_and_transformers(make_llm, model_dirs):
    path = str(model_dirs["llama3-gqa"])
    eager = make_llm("llama3-gqa", enforce_eager=True)
    graphs = make_llm("llama3-gqa", attention_backend="triton")
    assert graphs.llm_engine.runner.decode_graphs.graphs  # captured
    prompts = prompts_for(eager.llm_engine.vocab_size, [1, 5, 17, 40, 71])
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = [o.outputs[0].token_ids for o in eager.generate([{"prompt_token_ids": p} for p in prompts], params)]
    got = [o.outputs[0].token_ids for o in graphs.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == expected
    hf = hf_model(path).to("cuda")
    try:
        for prompt, tokens in zip(prompts, expected):
            out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False,
                              pad_token_id=2, eos_token_id=1)[0, len(prompt):].tolist()
            assert (out[: out.index(1) + 1] if 1 in out else out) == tokens
    finally:
        hf.to("cpu")


def test_async_scheduling_on_the_gpu_equals_sync(make_llm):
    """Step N+1 launched before step N's ids are read (pinned copy + event per step) gives the
    synchronous tokens, with CUDA graphs, seeded sampling and a penalty row that resolves early."""
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=50, seed=11, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3)]
    outs = []
    for async_mode in (False, True):
        llm = make_llm("llama3-gqa", attention_backend="triton", async_scheduling=async_mode)
        prompts = prompts_for(llm.llm_engine.vocab_size, [3, 17, 40], seed=7)
        outs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("graphs", [False, True])
def test_a_decode_step_syncs_the_host_once(make_llm, graphs):
    """The sampled ids' read-back is the one sync; inputs go up pinned and non-blocking."""
    llm = make_llm("llama3-gqa", attention_backend="triton", enforce_eager=not graphs)
    engine = llm.llm_engine
    for i, params in enumerate([SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                                SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=20, ignore_eos=True),
                                SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)]):
        engine.add_request(str(i), {"prompt_token_ids": [5 + i, 9, 11, 13]}, params)
    engine.step()  # the prefill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(5):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 1, syncs
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_unfinished_requests():
        engine.step()


def test_kv_cache_is_sized_from_the_profiled_peak(make_llm):
    total = torch.cuda.mem_get_info()[1]
    llm = make_llm("llama3-gqa", attention_backend="triton", kv_cache_memory=None, gpu_memory_utilization=0.1)
    runner = llm.llm_engine.runner
    kv_bytes = runner.num_blocks * runner.kv_bytes_per_block
    assert 0 < kv_bytes < 0.1 * total
    assert runner.profile_run(2048, 256) > 0  # logits and sampler rows of 256 sequences at least
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def _greedy_ids(llm, prompts, max_tokens=12):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def test_weight_offload_streams_layers_and_keeps_outputs(make_llm):
    """--cpu-offload-gb: pinned host weights copied a layer ahead on a side stream."""
    resident = make_llm("llama3-gqa", enforce_eager=True)
    offloaded = make_llm("llama3-gqa", cpu_offload_gb=1.0)
    runner = offloaded.llm_engine.runner
    assert runner.weight_offloader is not None and runner.weight_offloader.offloaded
    assert runner.decode_graphs is None
    prompts = prompts_for(resident.llm_engine.vocab_size, [3, 17, 40])
    assert _greedy_ids(offloaded, prompts) == _greedy_ids(resident, prompts)


def test_kv_offloading_reloads_evicted_prefixes_on_the_gpu(make_llm):
    """The host tier in pinned memory, copies on a side stream after the step's event."""
    plain = make_llm("llama3-gqa")
    tiered = make_llm("llama3-gqa", num_gpu_blocks_override=24, block_size=16, kv_offloading_size=0.01)
    prompts = prompts_for(plain.llm_engine.vocab_size, [150, 170, 140, 160], seed=3)
    want = [_greedy_ids(plain, [p], 6)[0] for p in prompts]
    for _ in range(2):
        assert [_greedy_ids(tiered, [p], 6)[0] for p in prompts] == want
    core = tiered.llm_engine.core
    core.settle_offload()
    assert core.connector.offload_report().hit_tokens.get("CPU", 0) > 0
