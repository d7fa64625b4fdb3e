"""Strict loading: a checkpoint that lacks a tensor or a fused shard, has a tensor of the wrong shape
or one the model does not know, fails with an error that names it; a checkpoint split over several
files and one with tied embeddings load whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LLM, SamplingParams
from tandem.model.attention import TorchAttentionBackend
from tandem.model.loader import load_model


def _copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of the model directory whose model.safetensors went through edit(tensors)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _load(path: Path):
    return load_model(path, torch.float32, torch.device("cpu"), TorchAttentionBackend())


@pytest.mark.parametrize("missing", [
    "model.layers.0.self_attn.k_proj.weight",  # one shard of the fused qkv_proj
    "model.layers.1.mlp.up_proj.weight",  # one shard of the fused gate_up_proj
    "model.layers.0.post_attention_layernorm.weight",  # a whole tensor
    "model.norm.weight",
    "lm_head.weight",  # untied head
])
def test_a_missing_tensor_or_shard_is_named(model_dirs, tmp_path, missing):
    path = _copy_with(model_dirs["llama3-gqa"], tmp_path / "m", lambda t: t.pop(missing))
    with pytest.raises(ValueError, match="missing tensors: " + missing.replace(".", r"\.")):
        _load(path)


def test_a_missing_bias_shard_is_named(model_dirs, tmp_path):
    name = "model.layers.0.self_attn.v_proj.bias"
    path = _copy_with(model_dirs["qwen2-tied"], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        _load(path)


def test_a_wrong_shape_names_the_tensor_and_both_shapes(model_dirs, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(t):
        t[name] = t[name][:-1]

    path = _copy_with(model_dirs["llama3-gqa"], tmp_path / "m", edit)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*shape"):
        _load(path)


def test_an_unknown_tensor_is_named(model_dirs, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)

    path = _copy_with(model_dirs["llama3-gqa"], tmp_path / "m", edit)
    with pytest.raises(ValueError, match="extra_proj"):
        _load(path)


def test_the_engine_refuses_a_partial_checkpoint_at_start(model_dirs, tmp_path):
    path = _copy_with(model_dirs["llama3-gqa"], tmp_path / "m",
                      lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="k_proj"):
        LLM(model=str(path), kv_cache_memory="8MiB")


def test_a_checkpoint_split_over_files_loads_and_matches(model_dirs, tmp_path):
    src = model_dirs["llama3-gqa"]
    dst = tmp_path / "split"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    # q_proj in one file, k_proj and v_proj in the other: a fused parameter assembled across files
    first = [n for i, n in enumerate(names) if i % 2 == 0]
    save_file({n: tensors[n] for n in first}, str(dst / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({n: tensors[n] for n in names if n not in first}, str(dst / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    whole, split = _load(src), _load(dst)
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters()):
        assert torch.equal(a, b), name

    params = SamplingParams(max_tokens=6, temperature=0.0)
    outs = [LLM(model=str(p), kv_cache_memory="8MiB").generate(["hello world"], params)[0].outputs[0].token_ids
            for p in (src, dst)]
    assert outs[0] == outs[1]

    # the index names both files: one of them gone is named, not reported as missing tensors
    weight_map = {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
                  for n in names}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(next(_load(dst).parameters()), next(whole.parameters()))
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="index lists model-00002-of-00002.safetensors, which is missing"):
        _load(dst)


def test_tied_embeddings_need_no_head_tensor(model_dirs):
    model = _load(model_dirs["qwen2-tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
