"""DeepSeek-V3's multi-head latent attention (tandem/model/mla.py) beyond the parity tests every
preset runs (deepseek-v3 with the q-LoRA, deepseek-v2 without): the cache holds one latent row per
token and layer (its size, counted once); the latent blocks move through P/D transfer (TCP and
shared memory) and the host tier as K/V blocks do; DeepSeek's FP8 block checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.engine.test_kv_transfer import decode_request, finished, make_core, prefill_ticket, run_until, tokens
from tests.engine.test_kv_transfer import single_output as single_tokens
from tests.helpers import hf_greedy, hf_model, prompts_for


def test_the_cache_holds_one_latent_row_per_token_and_layer(make_llm, model_dirs):
    from tandem.router.pd import kv_bytes_per_token_from_config

    llm = make_llm("deepseek-v3", block_size=16)
    runner = llm.llm_engine.core.runner
    cfg = json.loads((model_dirs["deepseek-v3"] / "config.json").read_text())
    row = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert runner.kv_bytes_per_block == cfg["num_hidden_layers"] * 16 * row * 4  # fp32, K and V one tensor
    for attn in runner.model.attention_layers():
        assert attn.v_cache is attn.k_cache and attn.k_cache.shape[1:] == (16, 1, row)
    full_kv = cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])
    assert full_kv / row > 3, "smaller than the expanded K/V it stands for"
    # the router's estimate before any ticket tells it (P/D splits)
    assert kv_bytes_per_token_from_config(str(model_dirs["deepseek-v3"])) == runner.kv_bytes_per_block // 16


@pytest.mark.parametrize("transport", ["tcp", "auto"])  # auto: the shared-memory region on one host
def test_latent_blocks_move_from_prefill_to_decode(model_dirs, transport):
    model = model_dirs["deepseek-v3"]
    prefill, decode = make_core(model, "prefill"), make_core(model, "decode", transport=transport)
    single = make_core(model)
    try:
        prompt = prompts_for(512, [70], seed=8)[0]
        decode.add_request(decode_request("d", prompt, prefill_ticket(prefill, "p", prompt), 8))
        assert tokens(run_until([prefill, decode], finished("d")), "d") == single_tokens(single, prompt, 8)
        moved = decode.connector.stats.bytes_received
        assert moved == -(-len(prompt) // 16) * decode.runner.kv_bytes_per_block, "each latent block once"
    finally:
        prefill.close()
        decode.close()


def test_latent_blocks_come_back_from_the_host_tier(make_llm, model_dirs):
    prompts = prompts_for(512, [150, 170, 140, 160], seed=3)
    want = [hf_greedy(str(model_dirs["deepseek-v3"]), p, 6) for p in prompts]
    llm = make_llm("deepseek-v3", kv_offloading_size=0.01, num_gpu_blocks_override=24, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=6)
    for _ in range(2):  # the second visit finds the first's blocks evicted from the device pool
        assert [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
                for p in prompts] == want
    core = llm.llm_engine.core
    core.settle_offload()
    report = core.connector.offload_report()
    assert report is not None and report.hit_tokens.get("CPU", 0) > 0


# DeepSeek-V3's FP8 checkpoint quantizes every projection, the experts' and MLA's included
MLA_LINEAR = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_deepseek_v3s_fp8_block_checkpoint_computes_its_dequantized_weights(model_dirs, tmp_path):
    """Linear layers stay FP8; fused experts and kv_b_proj (not linear layers here) take the
    dequantized weights: the logits are transformers' on the dequantized checkpoint."""
    from safetensors.torch import load_file, save_file

    from tests.engine.test_prequantized import CASES, _write_prequantized

    src = model_dirs["deepseek-v3"]
    config, kind_of = CASES["fp8-block-deepseek"]
    dequantized = _write_prequantized(src, tmp_path / "fp8", config, kind_of, MLA_LINEAR)
    # DeepSeek-V3 ships its multi-token-prediction layer, quantized too, as one layer more: skipped
    fp8 = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    fp8.update({k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in fp8.items()
                if k.startswith("model.layers.1.")})
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    float_dir = tmp_path / "dequantized"
    float_dir.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (float_dir / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(float_dir / "model.safetensors"))
    llm = LLM(model=str(tmp_path / "fp8"), kv_cache_memory="8MiB", cpu_gemm="blas")
    report = llm.llm_engine.runner.precision
    assert report is not None and "model.layers.0.self_attn.q_b_proj" in {x.name for x in report.layers if x.scheme}
    prompt = prompts_for(512, [23])[0]
    with torch.no_grad():
        want = hf_model(str(float_dir))(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(llm.llm_engine.core.score_logits(prompt), want, atol=2e-4, rtol=1e-4)


def test_a_latent_attention_draft_model_keeps_one_cache_tensor_per_layer(make_llm, model_dirs):
    """The model as its own draft: every proposal is accepted, the output is the model's own."""
    path = str(model_dirs["deepseek-v3"])
    prompt = prompts_for(512, [30])[0]
    params = SamplingParams(temperature=0, max_tokens=12)
    llm = make_llm("deepseek-v3", speculative_config={"method": "draft_model", "model": path,
                                                      "num_speculative_tokens": 3})
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(path, prompt, 12)
    drafter = llm.llm_engine.core.runner.drafter
    assert all(a.v_cache is a.k_cache for a in drafter.model.attention_layers())


def test_an_fp8_latent_cache_is_written_and_read_with_one_scale(make_llm):
    """K and V are one FP8 tensor: every backend reads the same pages back (the greedy tokens agree),
    the calibrated scale is the latent row's, and recomputation after preemption keeps the tokens."""
    from tandem.kernels import cpu_kernels

    prompts = prompts_for(512, [40, 21, 33], seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def greedy(llm):
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]

    backends = ["torch", "triton"] + (["cpu"] if cpu_kernels.available() else [])
    outs = {b: greedy(make_llm("deepseek-v3", attention_backend=b, kv_cache_dtype="fp8")) for b in backends}
    assert all(out == outs["torch"] for out in outs.values()), outs
    llm = make_llm("deepseek-v3", kv_cache_dtype="fp8", calculate_kv_scales=True, num_gpu_blocks_override=16,
                   block_size=4)
    base = greedy(llm)
    layers = llm.llm_engine.core.runner.model.attention_layers()
    assert all(a.k_cache is a.v_cache and a.k_cache.dtype == torch.float8_e4m3fn for a in layers)
    assert all(float(a.k_scale) not in (0.0, 1.0) for a in layers)
    assert greedy(llm) == base and llm.llm_engine.core.scheduler.num_preemptions > 0
