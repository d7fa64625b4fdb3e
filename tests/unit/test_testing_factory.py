"""The tiny-model factory builds directories that stock transformers loads offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.testing import (
    BOS_ID,
    EOS_ID,
    MULTIBYTE_SAMPLE,
    PAD_ID,
    PRESETS,
    bench_model_config,
    build_preset,
    build_tiny_model,
    build_tokenizer,
    main,
)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def preset_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: build_preset(name, root / name) for name in PRESETS}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_and_runs(preset_dirs: dict[str, Path], name: str) -> None:
    path = preset_dirs[name]
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    assert len(tok) <= model.config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (BOS_ID, EOS_ID)
    assert model.generation_config.eos_token_id == EOS_ID

    ids = tok.encode(MULTIBYTE_SAMPLE, add_special_tokens=False)
    assert tok.decode(ids) == MULTIBYTE_SAMPLE

    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nhi\n<|assistant|>\n"

    x = torch.randint(3, len(tok), (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()


def test_llama3_rope_in_config_json(preset_dirs: dict[str, Path]) -> None:
    rope = _config(preset_dirs["llama3-gqa"])["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 64
    cfg = _config(preset_dirs["llama3-gqa"])
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (4, 2, False)


def test_family_specific_shapes(preset_dirs: dict[str, Path]) -> None:
    qwen3 = AutoModelForCausalLM.from_pretrained(preset_dirs["qwen3-qknorm"], local_files_only=True)
    attn = qwen3.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 32 and attn.k_proj.out_features == 2 * 32
    assert attn.q_norm.weight.shape == (32,)

    qwen2 = AutoModelForCausalLM.from_pretrained(preset_dirs["qwen2-tied"], local_files_only=True)
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()

    assert _config(preset_dirs["llama-hd16"])["head_dim"] == 16
    assert _config(preset_dirs["mistral"])["sliding_window"] is None


def test_chat_template_saved_in_tokenizer_config(preset_dirs: dict[str, Path]) -> None:
    tok_cfg = json.loads((preset_dirs["mistral"] / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tok_cfg["chat_template"]


def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("vocab_size", [512, 8192])
def test_tokenizer_vocab_is_exact(tmp_path: Path, vocab_size: int) -> None:
    assert build_tokenizer(tmp_path, vocab_size) == vocab_size
    assert len(AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)) == vocab_size


def test_small_vocab_model_covers_tokenizer(tmp_path: Path) -> None:
    # 259 = 256 byte symbols + 3 specials: the floor for any byte-level tokenizer.
    path = build_tiny_model(tmp_path, vocab_size=100)
    assert _config(path)["vocab_size"] == 259


def test_bfloat16_dtype_key(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, dtype="bfloat16")
    assert _config(path)["dtype"] == "bfloat16"


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "x", family="gpt2")
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "y", family="qwen2", attention_bias=False)
    with pytest.raises(ValueError):
        build_preset("nope", tmp_path / "z")


def test_bench_config_shape() -> None:
    cfg = bench_model_config()
    assert cfg["family"] == "llama" and cfg["vocab_size"] == 8192
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (768, 12, 4)


def test_cli_builds_preset(tmp_path: Path) -> None:
    assert main([str(tmp_path / "cli"), "--preset", "qwen3-qknorm"]) == 0
    assert _config(tmp_path / "cli")["model_type"] == "qwen3"
