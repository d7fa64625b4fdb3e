"""Weight offload (--cpu-offload-gb): the plan, the prefetch schedule, and the offloader itself on a
CPU (where copies are synchronous): the layers read their weights from the two shared slots, each
filled one offloaded layer ahead, and greedy outputs stay the same. The GPU run (side stream,
pinned memory) waits for a lent device."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.runner.weight_offload import LayerOffloader, PrefetchStep, _param_bytes, plan_offload, prefetch_schedule
from tests.helpers import prompts_for

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_plan_takes_whole_layers_from_the_last_one_back():
    assert plan_offload([10, 10, 10, 10], 25) == [2, 3]
    assert plan_offload([10, 10, 10, 10], 9) == []
    assert plan_offload([10, 10, 10, 10], 100) == [0, 1, 2, 3]


def test_schedule_copies_one_offloaded_layer_ahead_into_alternating_slots():
    first, steps = prefetch_schedule(5, [1, 2, 4])
    assert first == 1
    assert steps == [
        PrefetchStep(0, None, None, None, None),
        PrefetchStep(1, wait=1, issue=2, slot=1, after=None),  # slot 1 is still unused in this forward
        PrefetchStep(2, wait=2, issue=4, slot=0, after=1),  # slot 0 again, once layer 1 is done
        PrefetchStep(3, None, None, None, None),
        PrefetchStep(4, wait=4, issue=None, slot=None, after=None),
    ]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_offloaded_layers_read_their_weights_from_the_slots(make_llm, model_dirs):
    llm = make_llm(cpu_gemm="blas", attention_backend="torch")
    prompts = prompts_for(llm.llm_engine.runner.args.vocab_size, lengths=[12, 30], seed=2)
    want = _greedy(llm, prompts)
    layers = llm.llm_engine.runner.model.model.layers
    assert len(layers) >= 2
    kept = 0  # the tiny model has 2 layers: both offloaded, one per slot (resident layers: the schedule test)
    budget = sum(_param_bytes(layer) for layer in layers[kept:])
    offloader = LayerOffloader(layers, budget, llm.llm_engine.runner.device, trace=True)
    assert offloader.offloaded == list(range(kept, len(layers)))
    slot_ptrs = {s.data_ptr() for s in offloader.slots}
    for i in offloader.offloaded:  # every parameter now lives inside the layer's slot
        base = offloader.slots[offloader.offloaded.index(i) % 2]
        for p in layers[i].parameters():
            assert base.data_ptr() <= p.data_ptr() < base.data_ptr() + base.numel()
    assert len(slot_ptrs) == 2
    assert _greedy(llm, prompts) == want
    first, steps = prefetch_schedule(len(layers), offloader.offloaded)
    one_forward = [("copy", first)]  # issued as the forward starts, then one offloaded layer ahead
    for step in steps:
        one_forward += [("copy", step.issue)] if step.issue is not None else []
        one_forward.append(("run", step.layer))
    assert offloader.trace is not None and len(offloader.trace) % len(one_forward) == 0
    assert offloader.trace == one_forward * (len(offloader.trace) // len(one_forward))


def test_a_layer_whose_copy_is_skipped_computes_garbage(make_llm, model_dirs):
    """The check above can fail: without the copy, the slot holds another layer's weights."""
    llm = make_llm(cpu_gemm="blas", attention_backend="torch")
    prompts = prompts_for(llm.llm_engine.runner.args.vocab_size, lengths=[20], seed=4)
    want = _greedy(llm, prompts)
    layers = llm.llm_engine.runner.model.model.layers
    offloader = LayerOffloader(layers, 10**12, llm.llm_engine.runner.device)
    skipped = offloader.offloaded[1]
    for slot in offloader.slots:  # what a never-filled slot holds: here a constant, so the check is certain
        slot.fill_(0x3F)
    issue = offloader._issue
    offloader._issue = lambda layer, after: None if layer == skipped else issue(layer, after)  # type: ignore[method-assign]
    assert _greedy(llm, prompts) != want


def test_cpu_offload_gb_is_refused_on_a_cpu(model_dirs):
    with pytest.raises(ValueError, match="on a CPU device the weights are already there"):
        LLM(model=str(model_dirs["llama3-gqa"]), cpu_offload_gb=1.0, kv_cache_memory="8MiB", device="cpu")
