"""The FP8 KV cache end to end on tiny random Llamas: sizing, every backend on the same FP8 pages,
prefix caching / chunked prefill / preemption, per-layer scales (checkpoint and calibrated),
skipped layers, errors, and disaggregated transfers of FP8 blocks.

FP8 is lossy, so nothing here compares with transformers: backends are held to each other and
the FP8 run to the full-precision one only loosely (first-token agreement)."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LLM, SamplingParams
from tandem.config import CacheConfig, EngineConfig, KVTransferConfig, ModelConfig, SchedulerConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request
from tandem.kernels import cpu_kernels
from tandem.kv_transfer.ticket import compat_hash, parse_ticket
from tests.helpers import prompts_for

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _greedy(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _layers(llm: LLM):
    return llm.llm_engine.runner.model.attention_layers()


def test_fp8_cache_holds_four_times_the_fp32_tokens_and_says_so(make_llm, caplog):
    fp32 = make_llm(attention_backend="torch")
    with caplog.at_level(logging.INFO, logger="tandem.runner.model_runner"):
        fp8 = make_llm(attention_backend="torch", kv_cache_dtype="fp8")
    assert fp8.llm_engine.runner.num_blocks == 4 * fp32.llm_engine.runner.num_blocks
    assert any("float8_e4m3fn" in r.getMessage() and "tokens" in r.getMessage() for r in caplog.records)
    assert all(a.k_cache.dtype == torch.float8_e4m3fn for a in _layers(fp8))
    # a skipped layer keeps float32, and a block costs what its layers hold
    mixed = make_llm(attention_backend="torch", kv_cache_dtype="fp8_e5m2", kv_cache_dtype_skip_layers=[1])
    runner = mixed.llm_engine.runner
    dtypes = [a.k_cache.dtype for a in _layers(mixed)]
    assert dtypes[1] == torch.float32 and all(d == torch.float8_e5m2 for i, d in enumerate(dtypes) if i != 1)
    per_layer_fp32 = fp32.llm_engine.runner.kv_bytes_per_block // len(dtypes)
    assert runner.kv_bytes_per_block == per_layer_fp32 * (1 + (len(dtypes) - 1) / 4)
    assert _greedy(mixed, prompts_for(mixed.llm_engine.vocab_size, [9]))  # it runs


def test_every_backend_reads_the_same_fp8_pages(make_llm):
    """Greedy tokens equal across the torch references, the C++ CPU kernels and Triton (interpreted)."""
    backends = ["torch", "triton"] + (["cpu"] if cpu_kernels.available() else [])
    prompts = prompts_for(500, [5, 23])
    outs = {b: _greedy(make_llm(attention_backend=b, kv_cache_dtype="fp8"), prompts) for b in backends}
    assert all(out == outs["torch"] for out in outs.values()), outs


def test_first_tokens_mostly_agree_with_the_full_precision_cache(make_llm):
    prompts = prompts_for(500, [30, 41, 17, 60, 25, 33, 48, 12, 29, 52, 19, 40], seed=3)
    first = SamplingParams(temperature=0, max_tokens=1)
    ref = _greedy(make_llm(kv_cache_dtype="auto"), prompts, first)
    got = _greedy(make_llm(kv_cache_dtype="fp8"), prompts, first)
    assert sum(a == b for a, b in zip(ref, got)) >= 0.75 * len(prompts)


VARIANTS = {
    "prefix-cache": dict(enable_prefix_caching=True),
    "tiny-budget-chunked-prefill": dict(max_num_batched_tokens=7),
    "forced-preemption": dict(num_gpu_blocks_override=32, block_size=4),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefix_cache_chunked_prefill_and_preemption_keep_fp8_outputs(variant, make_llm):
    prompts = prompts_for(500, [40, 20, 33], seed=1)
    prompts += [prompts[0][:33] + p for p in prompts[1:]]  # shared prefixes for the prefix cache
    base = _greedy(make_llm(kv_cache_dtype="fp8", enable_prefix_caching=False), prompts)
    llm = make_llm(kv_cache_dtype="fp8", **VARIANTS[variant])
    for _ in range(2):  # the second round hits the prefix cache
        assert _greedy(llm, prompts) == base
    engine = llm.llm_engine
    if variant == "forced-preemption":
        assert engine.scheduler.num_preemptions > 0
    if variant == "prefix-cache":
        assert engine.kv.stats.hits > 0


def test_calculate_kv_scales_sets_them_on_the_first_batch_then_keeps_them(make_llm):
    llm = make_llm(kv_cache_dtype="fp8", calculate_kv_scales=True, kv_cache_dtype_skip_layers=[0])
    layers = _layers(llm)
    assert all(float(a.k_scale) == 1.0 and float(a.v_scale) == 1.0 for a in layers)
    _greedy(llm, prompts_for(500, [24, 9]))
    scales = [(float(a.k_scale), float(a.v_scale)) for a in layers]
    assert scales[0] == (1.0, 1.0)  # the skipped layer keeps float32 and needs none
    assert all(k != 1.0 and v != 1.0 and k > 0 and v > 0 for k, v in scales[1:])
    assert not any(a.calibrate_kv_scales for a in layers)
    _greedy(llm, prompts_for(500, [50], seed=2))
    assert [(float(a.k_scale), float(a.v_scale)) for a in layers] == scales  # frozen after the first batch


def _with_kv_scales(src, dst, scales: dict[str, torch.Tensor]):
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    save_file({**weights, **scales}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_checkpoint_kv_scales_load(make_llm, model_dirs, tmp_path):
    src = model_dirs["llama3-gqa"]
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.125),  # vLLM / compressed-tensors
              "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
              "model.layers.1.self_attn.k_proj.output_scale": torch.tensor(0.5),  # older FP8 checkpoints
              "model.layers.1.self_attn.v_proj.output_scale": torch.tensor(2.0)}
    path = _with_kv_scales(src, tmp_path / "scaled", scales)
    llm = LLM(model=str(path), kv_cache_dtype="fp8", kv_cache_memory="8MiB")
    layers = _layers(llm)
    assert [(float(a.k_scale), float(a.v_scale)) for a in layers[:2]] == [(0.125, 0.25), (0.5, 2.0)]
    assert _greedy(llm, prompts_for(500, [12]))
    LLM(model=str(path), kv_cache_memory="8MiB")  # a full-precision cache loads (and ignores) them too
    bad = _with_kv_scales(src, tmp_path / "per-head", {"model.layers.0.self_attn.k_scale": torch.ones(2)})
    with pytest.raises(ValueError, match="one value per layer"):
        LLM(model=str(bad), kv_cache_dtype="fp8", kv_cache_memory="8MiB")


def test_skipped_layer_out_of_range_is_a_clear_error(model_dirs):
    with pytest.raises(ValueError, match="kv_cache_dtype_skip_layers: layer 99 out of range"):
        LLM(model=str(model_dirs["llama3-gqa"]), kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=[99],
            kv_cache_memory="8MiB")


def test_compat_hash_covers_cache_dtypes_and_scales():
    base = compat_hash({"m": 1}, "torch.float32", 16, ["torch.float32"] * 2, [(1.0, 1.0)] * 2)
    assert base != compat_hash({"m": 1}, "torch.float32", 16, ["torch.float8_e4m3fn"] * 2, [(1.0, 1.0)] * 2)
    assert base != compat_hash({"m": 1}, "torch.float32", 16, ["torch.float32"] * 2, [(1.0, 1.0), (0.5, 1.0)])


# -- disaggregated prefill/decode with FP8 blocks ----------------------------------------------------------
SECRET = b"f" * 32


def _core(model_dir, role=None, cache_dtype="fp8", skip=(1,), **kv) -> EngineCore:
    transfer = KVTransferConfig(role=role, secret=SECRET, lease_s=5.0, transfer_timeout_s=5.0, **kv) if role else None
    cache = CacheConfig(block_size=16, kv_cache_memory="4MiB", cache_dtype=cache_dtype,
                        kv_cache_dtype_skip_layers=list(skip))
    return EngineCore(EngineConfig(ModelConfig(str(model_dir), attention_backend="torch"), cache,
                                   SchedulerConfig(max_num_batched_tokens=256), kv_transfer=transfer))


def _run(cores, rid: str, timeout_s: float = 30.0) -> list[int]:
    """Step the cores until request rid ends: its tokens, and -1 appended if it ended in an error."""
    out: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "timed out"
        for core in cores:
            for o in core.step():
                if o.request_id == rid:
                    out += o.new_token_ids
                    if o.finish_reason:
                        return out + [-1] if o.finish_reason == "error" else out
        time.sleep(0.001)


def _ticket(prefill: EngineCore, rid: str, prompt: list[int]) -> dict:
    prefill.add_request(Request(rid, prompt, SamplingParams(temperature=0, max_tokens=1), max_tokens=1,
                                do_remote_decode=True))
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline
        for o in prefill.step():
            if o.request_id == rid and o.finish_reason:
                assert o.kv_transfer_params is not None
                return o.kv_transfer_params


@pytest.mark.parametrize("transport", ["tcp", "auto"])  # auto: shared memory on this host
def test_fp8_blocks_with_a_skipped_layer_transfer_byte_for_byte(model_dirs, transport):
    model = model_dirs["llama3-gqa"]
    prefill, decode, single = _core(model, "prefill"), _core(model, "decode", transport=transport), _core(model)
    try:
        prompt = prompts_for(500, [37], seed=4)[0]
        params = _ticket(prefill, "p", prompt)
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        decode.add_request(Request("d", prompt, greedy, max_tokens=6,
                                   remote_ticket=parse_ticket(params, SECRET, prompt)))
        got = _run([prefill, decode], "d")
        single.add_request(Request("s", prompt, greedy, max_tokens=6))
        assert got == _run([single], "s")
        stats = decode.connector.stats
        assert (stats.loads_shm if transport == "auto" else stats.loads_ok) == 1
    finally:
        prefill.close()
        decode.close()


def test_an_fp8_prefill_never_hands_blocks_to_a_full_precision_decode(model_dirs):
    model = model_dirs["llama3-gqa"]
    prefill, decode = _core(model, "prefill"), _core(model, "decode", cache_dtype="auto", skip=())
    try:
        assert prefill.connector.compat != decode.connector.compat
        prompt = prompts_for(500, [33], seed=5)[0]
        params = _ticket(prefill, "p2", prompt)
        decode.add_request(Request("d2", prompt, SamplingParams(temperature=0, max_tokens=4), max_tokens=4,
                                   remote_ticket=parse_ticket(params, SECRET, prompt)))
        assert _run([prefill, decode], "d2")[-1] == -1  # refused as incompatible: an error, no tokens
    finally:
        prefill.close()
        decode.close()


def test_calculated_scales_are_refused_with_kv_transfer(model_dirs):
    cache = CacheConfig(kv_cache_memory="4MiB", cache_dtype="fp8", calculate_kv_scales=True)
    transfer = KVTransferConfig(role="prefill", secret=SECRET)
    with pytest.raises(ValueError, match="calculate_kv_scales cannot be used with KV transfer"):
        EngineCore(EngineConfig(ModelConfig(str(model_dirs["llama3-gqa"])), cache, kv_transfer=transfer))
