"""Pre-quantized checkpoints load as they ship (tandem/quantization/checkpoint.py): tiny
compressed-tensors (FP8 W8A8 per channel and per tensor, INT8 W8A16, INT4 W4A16 packed, mixed
groups with ignore) and DeepSeek-style FP8 block checkpoints, written with their real config keys
and tensor names, give the logits of transformers running the same weights dequantized."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LLM
from tandem.cli import build_parser, main
from tandem.eval.quality import run_quality
from tandem.kernels import quant as Q
from tandem.quantization.schemes import Int8Weight
from tests.helpers import hf_model, prompts_for

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.view(n, k // group, group)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-12)
    return torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int8).view(n, k), scale


def _pack_int32(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """compressed-tensors' pack-quantized layout: codes + 2 ** (bits - 1), 32 // bits per int32, the
    first in the lowest bits (summed as int64, then wrapped to int32 as the format stores them)."""
    per = 32 // bits
    codes = (q.to(torch.int64) + (1 << (bits - 1))).view(q.shape[0], -1, per)
    packed = (codes << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _quantize(kind: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(checkpoint tensors by field, the dequantized weight)."""
    if kind == "fp8-channel":
        q, s = Q.quantize_fp8(w)
        return {"weight": q, "weight_scale": s[:, None].to(torch.bfloat16)}, q.float() * s[:, None].to(torch.bfloat16).float()
    if kind == "fp8-tensor":
        s = w.abs().max() / Q.FP8_E4M3_MAX
        q = (w / s).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": s.reshape(1), "input_scale": torch.tensor([0.02])}, q.float() * s
    if kind == "fp8-block":
        q, s = Q.quantize_fp8(w, block=True)
        return {"weight": q, "weight_scale_inv": s}, Q.dequantize_fp8(q, s)
    if kind == "int8":
        q, s = Q.quantize_int8(w)
        return {"weight": q, "weight_scale": s[:, None]}, Q.dequantize_int8(q, s)
    if kind == "int8-packed":
        q, s = Q.quantize_int8(w)
        return ({"weight_packed": _pack_int32(q, 8), "weight_scale": s[:, None], "weight_shape": torch.tensor(list(w.shape))},
                Q.dequantize_int8(q, s))
    q, s = _int4_groups(w, 32)
    return ({"weight_packed": _pack_int32(q), "weight_scale": s, "weight_shape": torch.tensor(list(w.shape))},
            q.float() * s.repeat_interleave(32, dim=1))


def _group(bits: int, kind: str, strategy: str, **extra) -> dict:
    return {"num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False, **extra}


FP8_DYNAMIC = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
FP8_STATIC = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
CASES = {
    # name: (quantization_config, module name -> kind or None)
    "ct-fp8-w8a8-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                             "config_groups": {"group_0": {"targets": ["Linear"], "weights": _group(8, "float", "channel"),
                                                           "input_activations": FP8_DYNAMIC}}},
                            lambda m: "fp8-channel"),
    "ct-fp8-w8a8-tensor-static": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                                   "ignore": ["lm_head"],
                                   "config_groups": {"group_0": {"targets": ["Linear"],
                                                                 "weights": _group(8, "float", "tensor"),
                                                                 "input_activations": FP8_STATIC}}},
                                  lambda m: "fp8-tensor"),
    "ct-int8-w8a16": ({"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
                       "config_groups": {"group_0": {"targets": ["Linear"], "weights": _group(8, "int", "channel")}}},
                      lambda m: "int8"),
    "ct-int8-w8a16-packed": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                              "config_groups": {"group_0": {"targets": ["Linear"],
                                                            "weights": _group(8, "int", "channel")}}},
                             lambda m: "int8-packed"),
    "ct-w4a16-mixed": ({"quant_method": "compressed-tensors", "format": "mixed-precision",
                        "ignore": ["lm_head", "re:model\\.layers\\.0\\.mlp\\..*"],
                        "config_groups": {
                            "attn": {"targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"], "weights": _group(8, "float", "channel")},
                            "mlp": {"targets": ["re:.*mlp\\..*_proj$"], "weights": _group(4, "int", "group", group_size=32)}}},
                       lambda m: None if m.startswith("model.layers.0.mlp.") else
                       "fp8-channel" if ".self_attn." in m else "int4"),
    "fp8-block-deepseek": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}, lambda m: "fp8-block"),
}


def _write_prequantized(src: Path, dst: Path, config: dict, kind_of, linear=LINEAR) -> dict[str, torch.Tensor]:
    """Copy the model directory with its linear layers (modules named ``linear``) quantized;
    returns the dequantized state dict."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, dict(state)
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        kind = kind_of(module) if leaf == "weight" and module.rsplit(".", 1)[-1] in linear else None
        if kind is None:
            out[name] = tensor
            continue
        fields, deq = _quantize(kind, tensor.float())
        out.update({f"{module}.{f}": t for f, t in fields.items()})
        dequantized[name] = deq
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}))
    return dequantized


@pytest.mark.parametrize("case", list(CASES))
def test_prequantized_checkpoint_equals_transformers_dequantized(case, model_dirs, tmp_path):
    src = model_dirs["llama3-gqa"]
    config, kind_of = CASES[case]
    dequantized = _write_prequantized(src, tmp_path / "q", config, kind_of)
    llm = LLM(model=str(tmp_path / "q"), cpu_gemm="blas", kv_cache_memory="8MiB")
    for module in llm.llm_engine.runner.model.modules():
        if isinstance(module, Int8Weight):  # routes were measured at load; the fp32 path compares at 1e-4
            assert len(module.cpu_routes) == 4
            module.cpu_routes = ("tandem",) * 4
    report = llm.llm_engine.runner.precision
    assert report is not None and report.weight_bytes_after < report.weight_bytes_before
    quantized = {layer.name for layer in report.layers if layer.scheme}
    assert "lm_head" not in quantized and ("model.layers.0.mlp.down_proj" in quantized) == (case != "ct-w4a16-mixed")
    hf = copy.deepcopy(hf_model(str(src)))  # hf_model is cached and shared: change a copy
    hf.load_state_dict(dequantized)
    for prompt in prompts_for(hf.config.vocab_size, lengths=[6, 19]):
        with torch.no_grad():
            theirs = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(llm.llm_engine.core.score_logits(prompt), theirs, atol=2e-4, rtol=1e-4)
    llm.llm_engine.assert_idle()


def test_quality_gate_compares_a_prequantized_checkpoint_with_its_float_model(model_dirs, tmp_path):
    src = model_dirs["llama3-gqa"]
    config, kind_of = CASES["ct-int8-w8a16-packed"]
    _write_prequantized(src, tmp_path / "q", config, kind_of)
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    gate = ["--text", str(text), "--window", "64", "--continuation-len", "4", "--cpu-gemm", "blas"]
    with pytest.raises(ValueError, match="nothing to compare"):
        run_quality(build_parser().parse_args(["eval", "quality", str(tmp_path / "q"), *gate]))
    out = tmp_path / "q.json"
    assert main(["eval", "quality", str(tmp_path / "q"), "--reference", str(src), *gate, "--max-ppl-ratio", "1.1",
                 "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["reference"] == str(src) and record["policy"]["source"] == "checkpoint (compressed-tensors)"
    assert record["mean_kl"] > 0  # the int8 weights differ from the float ones they were made from


def test_prequantized_checkpoint_errors_name_the_problem(model_dirs, tmp_path):
    src = model_dirs["llama3-gqa"]
    config, kind_of = CASES["ct-int8-w8a16"]
    _write_prequantized(src, tmp_path / "q", config, kind_of)
    with pytest.raises(ValueError, match="already quantized \\(compressed-tensors\\)"):
        LLM(model=str(tmp_path / "q"), quantization="int8", kv_cache_memory="8MiB")
    # a scale tensor gone: the module's own name in the error
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_proj.weight': stored as torch.int8, .* without the scales"):
        LLM(model=str(tmp_path / "q"), kv_cache_memory="8MiB")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="asymmetric"):
        LLM(model=str(tmp_path / "q"), kv_cache_memory="8MiB")
    cfg["quantization_config"] = {"quant_method": "gptq"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="'gptq' is not supported"):
        LLM(model=str(tmp_path / "q"), kv_cache_memory="8MiB")
