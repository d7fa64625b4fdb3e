"""Mixture-of-Experts models (Qwen3-MoE, Mixtral, GLM-4-MoE, gpt-oss) beyond the parity tests every preset runs
(tests/engine/test_model_parity.py): both checkpoint layouts of the experts, a missing expert
named, greedy parity with transformers through prefix hits, chunked prefill and preemption, and
gpt-oss's MXFP4 checkpoint format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LLM, SamplingParams
from tests.helpers import hf_greedy, prompts_for


def _copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)


def _fuse_experts(tensors: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> the fused [E, 2I, H] / [E, H, I] layout transformers 5 uses in memory."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in range(num_layers):
        head = f"model.layers.{layer}.mlp.experts"
        if f"{head}.0.gate_proj.weight" not in tensors:
            continue  # a dense layer
        out[f"{head}.gate_up_proj"] = torch.stack([
            torch.cat([tensors[f"{head}.{e}.gate_proj.weight"], tensors[f"{head}.{e}.up_proj.weight"]])
            for e in range(num_experts)])
        out[f"{head}.down_proj"] = torch.stack([tensors[f"{head}.{e}.down_proj.weight"] for e in range(num_experts)])
    return out


def test_fused_expert_checkpoints_load_like_per_expert_ones(make_llm, model_dirs, tmp_path):
    src = model_dirs["qwen3-moe"]
    fused = tmp_path / "fused"
    _copy_without_weights(src, fused)
    save_file(_fuse_experts(load_file(str(src / "model.safetensors")), 2, 8), str(fused / "model.safetensors"))
    prompt = prompts_for(512, [29])[0]
    per_expert = make_llm("qwen3-moe").llm_engine.core.score_logits(prompt)
    from_fused = LLM(model=str(fused), kv_cache_memory="8MiB").llm_engine.core.score_logits(prompt)
    torch.testing.assert_close(from_fused, per_expert, rtol=0, atol=0)


def test_layers_past_the_last_are_skipped(make_llm, model_dirs, tmp_path):
    """GLM-4.5 ships its multi-token-prediction layer as one more decoder layer; it is not served."""
    src = model_dirs["glm4-moe"]
    extended = tmp_path / "mtp"
    _copy_without_weights(src, extended)
    tensors = load_file(str(src / "model.safetensors"))
    tensors.update({k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in tensors.items()
                    if k.startswith("model.layers.1.")})
    save_file(tensors, str(extended / "model.safetensors"))
    prompt = prompts_for(512, [19])[0]
    torch.testing.assert_close(LLM(model=str(extended), kv_cache_memory="8MiB").llm_engine.core.score_logits(prompt),
                               make_llm("glm4-moe").llm_engine.core.score_logits(prompt), rtol=0, atol=0)


def test_a_missing_expert_tensor_is_named(model_dirs, tmp_path):
    src = model_dirs["mixtral"]
    broken = tmp_path / "broken"
    _copy_without_weights(src, broken)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        LLM(model=str(broken), kv_cache_memory="8MiB")


@pytest.mark.parametrize("preset", ["qwen3-moe", "mixtral", "glm4-moe", "gpt-oss", "deepseek-v3",
                                    "deepseek-v2"])
def test_moe_greedy_matches_transformers_with_cache_chunks_and_preemption(preset, make_llm, model_dirs):
    llm = make_llm(preset, max_num_batched_tokens=24, num_gpu_blocks_override=24, block_size=4)
    base = prompts_for(llm.llm_engine.vocab_size)
    prompts = base + [base[4][:33] + p for p in base[:2]]  # shared prefixes for the prefix cache
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=16),
                        use_tqdm=False)
    path = str(model_dirs[preset])
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, p, 16), f"prompt of {len(p)} tokens"
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    (twice,) = llm.generate([{"prompt_token_ids": base[1]}], SamplingParams(temperature=0, max_tokens=8, n=2),
                            use_tqdm=False)
    assert [c.token_ids for c in twice.outputs] == [hf_greedy(path, base[1], 8)] * 2


def test_expert_token_counts_cover_every_routed_token(make_llm):
    llm = make_llm("qwen3-moe")  # layer 0 sparse (8 experts, top 2), layer 1 dense
    core = llm.llm_engine.core
    assert core.runner.take_expert_tokens() == [[0] * 8], "start-up steps are not counted"
    prompts = prompts_for(llm.llm_engine.vocab_size, [10, 23])
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=5,
                                                                             ignore_eos=True), use_tqdm=False)
    (counts,) = core.runner.take_expert_tokens()
    computed = sum(len(p) for p in prompts) + 2 * 4  # every prompt token, then 4 decode steps each
    assert sum(counts) == 2 * computed
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)
    (imbalance,) = core.expert_load_imbalance(min_interval_s=0)
    assert imbalance >= 1.0
    assert core.expert_load_imbalance(min_interval_s=3600) == [], "read at most once per interval"


def test_a_moe_model_disaggregates_like_a_dense_one(model_dirs):
    """Prefill on one core, KV pulled over TCP by another: the MoE model decodes the single core's tokens."""
    from tests.engine.test_kv_transfer import decode_request, finished, make_core, prefill_ticket, run_until, tokens
    from tests.engine.test_kv_transfer import single_output as single_tokens

    model = model_dirs["qwen3-moe"]
    prefill, decode, single = make_core(model, "prefill"), make_core(model, "decode", transport="tcp"), make_core(model)
    try:
        prompt = prompts_for(512, [70], seed=8)[0]
        decode.add_request(decode_request("d", prompt, prefill_ticket(prefill, "p", prompt), 8))
        assert tokens(run_until([prefill, decode], finished("d")), "d") == single_tokens(single, prompt, 8)
    finally:
        prefill.close()
        decode.close()


def _to_mxfp4(src, dst):
    """gpt-oss as OpenAI ships it: each fused expert tensor as E2M1 ``_blocks`` + E8M0 ``_scales``
    ([E, rows, K/32, 16] / [E, rows, K/32], rows = the output features), the rest unquantized."""
    from tandem.kernels import quant

    _copy_without_weights(src, dst)
    out = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = t
            continue
        w = t.transpose(1, 2).contiguous()  # the bf16 layout is [E, K, rows]
        e, rows, k = w.shape
        packed, scales = quant.quantize_mxfp4(w.reshape(e * rows, k))
        out[name + "_blocks"] = packed.view(e, rows, k // 32, 16)
        out[name + "_scales"] = scales.view(e, rows, k // 32)
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return out


def test_gpt_oss_mxfp4_checkpoint_computes_what_transformers_dequantizes(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    mx = tmp_path / "mxfp4"
    _to_mxfp4(model_dirs["gpt-oss"], mx)
    prompt = prompts_for(512, [29])[0]
    ours = LLM(model=str(mx), kv_cache_memory="8MiB").llm_engine.core.score_logits(prompt)
    hf = AutoModelForCausalLM.from_pretrained(str(mx), quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    unquantized = LLM(model=str(model_dirs["gpt-oss"]), kv_cache_memory="8MiB").llm_engine.core.score_logits(prompt)
    assert (unquantized - ours).abs().max() > 1e-2, "the checkpoint's FP4 experts are what runs"


def test_an_mxfp4_expert_without_its_scales_is_named(model_dirs, tmp_path):
    mx = tmp_path / "mxfp4"
    tensors = _to_mxfp4(model_dirs["gpt-oss"], mx)
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(mx / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.mlp\.experts\.down_proj_scales"):
        LLM(model=str(mx), kv_cache_memory="8MiB")


def test_experts_run_packed_for_onednn_on_a_cpu_with_the_blas_result(make_llm):
    """cpu_gemm onednn packs every expert's weights; the logits are the BLAS path's to fp32 rounding."""
    from tandem.model.moe import FusedExperts

    prompt = prompts_for(512, [33])[0]
    packed, blas = make_llm("gpt-oss", cpu_gemm="onednn"), make_llm("gpt-oss", cpu_gemm="blas")
    experts = [m for m in packed.llm_engine.core.runner.model.modules() if isinstance(m, FusedExperts)]
    assert experts and all(e.gemm_routes is not None and len(e.gemm_routes[0]) == e.num_experts for e in experts)
    assert all(m.gemm_routes is None for m in blas.llm_engine.core.runner.model.modules()
               if isinstance(m, FusedExperts))
    torch.testing.assert_close(packed.llm_engine.core.score_logits(prompt), blas.llm_engine.core.score_logits(prompt),
                               rtol=1e-5, atol=1e-5)
