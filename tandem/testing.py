"""Tiny random Hugging Face model directories, built locally for tests and benchmarks.

Everything here works offline: the tokenizer is trained on Python standard-library
source text, and model weights are random (seeded). A built directory holds
config.json, model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json (with a chat template), so it loads with
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.

Token ids are fixed: ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2. The tokenizer
does not add ``<|bos|>`` on encode; the chat template emits it.

CLI: ``python -m tandem.testing OUT_DIR [--preset NAME | --bench]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "CHAT_TEMPLATE",
    "MULTIBYTE_SAMPLE",
    "FAMILIES",
    "PRESETS",
    "build_tokenizer",
    "build_tiny_model",
    "build_preset",
    "bench_model_config",
    "build_bench_model",
    "main",
]

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
# Trainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

MULTIBYTE_SAMPLE = "héllo wörld — 你好 🙂"

# ChatML-like; role markers are plain text, only <|bos|> is special.
# Tools as a system turn, an assistant's calls in Hermes' <tool_call> form (read back with
# --tool-call-parser hermes). Without tools the text is the plain turns. NOTE: Hugging Face renders
# with trim_blocks, so a newline right after a block tag is dropped: newlines there are {{ "\n" }}.
TOOLS_TURN = (
    "{% if tools %}<|system|>{{ '\\n' }}Call a function as <tool_call>{\"name\": ..., \"arguments\": {...}}"
    "</tool_call>. Functions:{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}{% endif %}"
)
TOOL_CALLS = (
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}" + TOOLS_TURN +
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + TOOL_CALLS + "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Module sources used as training text. The small corpus (~84 kB) yields ~3.9k
# tokens; vocabularies above SMALL_CORPUS_MAX_VOCAB use the large one (~1.6 MB).
_SMALL_CORPUS_MODULES: tuple[str, ...] = ("textwrap", "string", "json", "functools")
_LARGE_CORPUS_EXTRA_MODULES: tuple[str, ...] = (
    "collections",
    "typing",
    "inspect",
    "argparse",
    "dataclasses",
    "enum",
    "pathlib",
    "subprocess",
    "threading",
    "logging",
    "difflib",
    "pydoc",
    "tarfile",
    "zipfile",
    "email.message",
    "http.client",
    "unittest.case",
    "asyncio.base_events",
    "datetime",
)
SMALL_CORPUS_MAX_VOCAB = 2048


# --------------------------------------------------------------------------- tokenizer


def _module_source(name: str) -> str:
    path = inspect.getsourcefile(importlib.import_module(name))
    if path is None:
        raise RuntimeError(f"no source file for stdlib module {name!r}")
    return Path(path).read_text(encoding="utf-8")


def _corpus(vocab_size: int) -> list[str]:
    modules = _SMALL_CORPUS_MODULES
    if vocab_size > SMALL_CORPUS_MAX_VOCAB:
        modules = modules + _LARGE_CORPUS_EXTRA_MODULES
    return [_module_source(m) for m in modules] + [MULTIBYTE_SAMPLE]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Serialized trained tokenizer; a str so cached state can't be mutated by callers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols are in the vocab, so any UTF-8 text is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=0,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [BOS_ID, EOS_ID, PAD_ID], ids
    return tok.to_str()


def _hf_tokenizer(vocab_size: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _pin_tokenizer_config(out: Path) -> None:
    """Write an explicit null unk_token.

    AutoTokenizer maps model_type "qwen2" to Qwen2Tokenizer whatever tokenizer_class
    says, and that class otherwise adds "<|endoftext|>" as unk_token at id
    len(vocab), one past the model's embedding table.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["unk_token"] = None
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> int:
    """Write a deterministic byte-level BPE tokenizer to out_dir; return len(tokenizer).

    len(tokenizer) <= max(vocab_size, 259): the 256 byte symbols plus 3 special
    tokens are always present, and a corpus may run out of merges before vocab_size.
    The chat template lives in tokenizer_config.json (no chat_template.jinja).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A stale chat_template.jinja would take precedence over tokenizer_config.json.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok = _hf_tokenizer(vocab_size)
    tok.save_pretrained(str(out), save_jinja_files=False)
    _pin_tokenizer_config(out)
    return len(tok)


# --------------------------------------------------------------------------- models


def _config_class(family: str) -> type:
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Glm4MoeConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    classes: dict[str, type] = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "qwen3_moe": Qwen3MoeConfig,
        "mixtral": MixtralConfig,
        "glm4_moe": Glm4MoeConfig,
        "gpt_oss": GptOssConfig,
        "deepseek_v2": DeepseekV2Config,
        "deepseek_v3": DeepseekV3Config,
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(classes)}")
    return classes[family]


FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "glm4_moe", "gpt_oss",
                             "deepseek_v2", "deepseek_v3")


def _rope_parameters(rope_theta: float, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers>=5 form: one dict holding rope_type, rope_theta and scaling fields."""
    params: dict[str, Any] = {"rope_type": "default"}
    if rope_scaling:
        scaling = dict(rope_scaling)
        if "type" in scaling:  # pre-4.45 spelling
            scaling.setdefault("rope_type", scaling.pop("type"))
        params.update(scaling)
    params["rope_theta"] = float(rope_theta)
    return params


def _attention_bias_kwargs(family: str, attention_bias: bool | None) -> dict[str, Any]:
    """qwen2 always has q/k/v bias and mistral never does; llama/qwen3 take a flag."""
    if attention_bias is None:
        return {}
    fixed = {"qwen2": True, "mistral": False, "mixtral": False}
    if family in fixed:
        if attention_bias != fixed[family]:
            raise ValueError(f"{family} has attention_bias={fixed[family]} fixed by its architecture")
        return {}
    return {"attention_bias": attention_bias}


def _make_config(family: str, vocab_size: int, *, dtype: str, extra: dict[str, Any], **kw: Any) -> Any:
    cls = _config_class(family)
    kwargs = dict(
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype=dtype,
        **kw,
    )
    kwargs.update(extra)
    return cls(**kwargs)


def _write_generation_config(out_dir: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        str(out_dir)
    )


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    attention_bias: bool | None = None,
    initializer_range: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Build a random `family` causal LM plus tokenizer in out_dir and return its Path.

    The tokenizer is trained for `vocab_size`; the model's vocab_size is
    max(vocab_size, len(tokenizer)) so every token id has an embedding row.
    The global torch RNG state is left untouched.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_len = build_tokenizer(out, vocab_size)
    config = _make_config(
        family,
        max(vocab_size, tok_len),
        dtype=dtype,
        extra=dict(extra_config or {}),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        # Explicit always: Qwen3Config defaults head_dim to 128, not hidden/heads.
        head_dim=head_dim or hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=_rope_parameters(rope_theta, rope_scaling),
        initializer_range=initializer_range,
        **_attention_bias_kwargs(family, attention_bias),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # transformers starts biases at 0: random, so that every one is exercised
            for name, tensor in model.state_dict().items():
                if name.endswith("bias"):  # q/k/v/o, router and expert biases, e_score_correction_bias
                    tensor.copy_(torch.randn(tensor.shape) * 0.1)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    _write_generation_config(out)
    return out


# --------------------------------------------------------------------------- presets

_LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-gqa": dict(
        family="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_scaling=_LLAMA3_ROPE,
        rope_theta=500000.0,
    ),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True, attention_bias=True),
    "qwen3-qknorm": dict(
        family="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "mistral": dict(family="mistral", extra_config={"sliding_window": None}),
    # a window much shorter than the prompts, so every prefill chunk and decode is clipped by it
    "mistral-swa": dict(family="mistral", extra_config={"sliding_window": 7}),
    # head_dim 16 (vLLM's CPU build refuses it) with heads * head_dim != hidden: non-square q/o projections
    "llama-hd16": dict(family="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=16),
    # YaRN over an original context of 64 positions (the parity prompts run past it)
    "qwen3-yarn": dict(family="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    # Mixture of Experts: 8 experts, top 2 unnormalised (Qwen3-MoE's default), layer 1 dense
    "qwen3-moe": dict(family="qwen3_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      extra_config={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "norm_topk_prob": False, "mlp_only_layers": [1]}),
    "mixtral": dict(family="mixtral", intermediate_size=48,
                    extra_config={"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    # GLM-4-MoE: sigmoid routing over 2 groups of 4 (top 1 group), a shared expert, layer 0 dense,
    # half the head dims rotated, q/k/v bias
    "glm4-moe": dict(family="glm4_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     attention_bias=True, rope_scaling={"partial_rotary_factor": 0.5},
                     extra_config={"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                   "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
                                   "first_k_dense_replace": 1, "norm_topk_prob": True}),
    # gpt-oss: 8 experts (top 2, softmax over the two), biased experts and router, a SwiGLU limit low
    # enough that its clamps bite, attention sinks, q/k/v/o bias, layer 0 with a window of 7 (shorter
    # than the prompts) and layer 1 full, YaRN without truncation
    "gpt-oss": dict(family="gpt_oss", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=32,
                    rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
                    extra_config={"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 7,
                                  "swiglu_limit": 1.5}),
    # DeepSeek-V3: multi-head latent attention (q through a rank-32 latent, a cached latent of 32 + a
    # shared rope key of 8, interleaved rope, YaRN with mscale_all_dim folded into the softmax scale),
    # and GLM-4-MoE's routing (8 experts in 2 groups, a shared expert, layer 0 dense)
    "deepseek-v3": dict(family="deepseek_v3", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                        intermediate_size=96,
                        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                      "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0},
                        extra_config={"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                      "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
                                      "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                                      "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
                                      "first_k_dense_replace": 1, "norm_topk_prob": True}),
    # DeepSeek-V2: the same latent attention without the q-LoRA (as V2-Lite), softmax routing limited
    # to the best of 2 groups (group_limited_greedy), unnormalised weights times 2.0, plain rope
    "deepseek-v2": dict(family="deepseek_v2", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                        intermediate_size=96,
                        extra_config={"q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                      "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
                                      "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 2,
                                      "n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy",
                                      "routed_scaling_factor": 2.0, "first_k_dense_replace": 1}),
}


def build_preset(name: str, out_dir: str | Path) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return build_tiny_model(out_dir, **PRESETS[name])


EAGLE_ARCHITECTURE = "EagleLlamaForCausalLM"  # vLLM's name for the EAGLE-1 Llama head (tandem/model/eagle.py)


class EagleHeadHF(torch.nn.Module):
    """An EAGLE-1 head in transformers' modules: what scripts/train_eagle.py trains and what the tests
    check tandem's head against. Causal attention over the whole window (no cache). ``forward(embeds,
    features)``: both [B, T, H], position t holding the embedding of token t + 1 and the target's
    feature at t (its final hidden state, after the final norm); returns the predicted f_{t+1}."""

    def __init__(self, config: Any) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        hidden = config.hidden_size
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = torch.nn.Identity()  # EAGLE: the first layer reads fc's output as is
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([embeds, features], dim=-1))
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        rope = self.rotary_emb(h, positions)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
        return h


def eagle_head_config(target_dir: str | Path, num_layers: int = 1) -> Any:
    """The LlamaConfig of an EAGLE head for the model in ``target_dir``: its widths, ``num_layers``."""
    from transformers import LlamaConfig

    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    cfg.update(num_hidden_layers=num_layers, architectures=[EAGLE_ARCHITECTURE], model_type="llama")
    for key in ("transformers_version", "layer_types"):  # per-layer lists of the target, not the head
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    return config


def save_eagle_head(out_dir: str | Path, head: EagleHeadHF, config: Any) -> Path:
    """vLLM's EAGLE checkpoint layout: ``fc.weight`` and ``layers.N.*`` (no embeddings, no LM head)."""
    return _save_head(out_dir, _head_tensors(head), config)


def _head_tensors(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in head.state_dict().items() if not k.startswith("rotary_emb.")}


def _save_head(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: Any) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return out


def load_eagle_head_hf(head_dir: str | Path, target_dir: str | Path) -> EagleHeadHF:
    from safetensors.torch import load_file

    config = json.loads((Path(head_dir) / "config.json").read_text())
    head = EagleHeadHF(eagle_head_config(target_dir, config["num_hidden_layers"]))
    head.load_state_dict(load_file(str(Path(head_dir) / "model.safetensors")), strict=False)
    return head.eval()


def build_tiny_eagle_head(out_dir: str | Path, target_dir: str | Path, num_layers: int = 1, seed: int = 0) -> Path:
    """A random EAGLE head (torch's default init: attention matters to its output) for the model in
    ``target_dir``. The global torch RNG state is left untouched."""
    config = eagle_head_config(target_dir, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EagleHeadHF(config)
    return save_eagle_head(out_dir, head, config)


EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"  # vLLM's name for the EAGLE-3 Llama head


class Eagle3HeadHF(torch.nn.Module):
    """An EAGLE-3 head in transformers' modules (the tests' reference; tandem/model/eagle.py says the
    layout). ``forward(embeds, features)``: features already of the hidden size (the target's aux
    states through ``fc``, or the head's own predictions); returns the predictions before ``norm``.
    ``draft_tokens(hidden)``: target token ids."""

    d2t: torch.Tensor

    def __init__(self, config: Any, num_aux: int, draft_vocab_size: int) -> None:
        import copy

        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        hidden = config.hidden_size
        self.fc = torch.nn.Linear(num_aux * hidden, hidden, bias=False)
        wide = copy.deepcopy(config)
        wide.hidden_size = 2 * hidden  # attention reads [embedding, feature]
        self.midlayer: Any = torch.nn.Module()  # vLLM's names: midlayer.self_attn, .mlp and three norms
        self.midlayer.self_attn = LlamaAttention(wide, 0)
        self.midlayer.self_attn.o_proj = torch.nn.Linear(config.num_attention_heads * config.head_dim, hidden, bias=False)
        self.midlayer.mlp = LlamaMLP(config)
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            setattr(self.midlayer, name, LlamaRMSNorm(hidden, eps=config.rms_norm_eps))
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = torch.nn.Linear(hidden, draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        m = self.midlayer
        positions = torch.arange(features.shape[1]).unsqueeze(0).expand(features.shape[0], -1)
        x = torch.cat([m.input_layernorm(embeds), m.hidden_norm(features)], dim=-1)
        h = features + m.self_attn(x, position_embeddings=self.rotary_emb(x, positions), attention_mask=None)[0]
        return h + m.mlp(m.post_attention_layernorm(h))

    def draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        best = self.lm_head(self.norm(hidden)).argmax(-1)
        return best + self.d2t[best]


def eagle3_head_config(target_dir: str | Path, aux_layers: list[int], draft_vocab_size: int) -> Any:
    """The LlamaConfig of an EAGLE-3 head (vLLM's keys: draft_vocab_size, eagle_config)."""
    config = eagle_head_config(target_dir)
    config.architectures = [EAGLE3_ARCHITECTURE]
    config.draft_vocab_size = draft_vocab_size
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": aux_layers, "use_aux_hidden_state": True}
    return config


def build_tiny_eagle3_head(out_dir: str | Path, target_dir: str | Path, aux_layers: list[int],
                           draft_vocab_size: int, seed: int = 0) -> Path:
    """A random EAGLE-3 head whose draft vocabulary is every other token of the target's first
    2 x draft_vocab_size (d2t: draft id i -> target id 2i + 1)."""
    config = eagle3_head_config(target_dir, aux_layers, draft_vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Eagle3HeadHF(config, len(aux_layers), draft_vocab_size)
    head.d2t.copy_(torch.arange(draft_vocab_size, dtype=torch.int64) + 1)  # draft i -> target 2i + 1
    return save_eagle3_head(out_dir, head, config)


def save_eagle3_head(out_dir: str | Path, head: Eagle3HeadHF, config: Any) -> Path:
    """vLLM's EAGLE-3 checkpoint layout: ``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t`` and
    its inverse ``t2d`` (which target tokens the draft vocabulary has)."""
    tensors = _head_tensors(head)
    tensors["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool)
    tensors["t2d"][torch.arange(len(head.d2t)) + head.d2t] = True
    return _save_head(out_dir, tensors, config)


def load_eagle3_head_hf(head_dir: str | Path, target_dir: str | Path) -> Eagle3HeadHF:
    from safetensors.torch import load_file

    raw = json.loads((Path(head_dir) / "config.json").read_text())
    aux = raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    head = Eagle3HeadHF(eagle3_head_config(target_dir, aux, raw["draft_vocab_size"]), len(aux), raw["draft_vocab_size"])
    tensors = load_file(str(Path(head_dir) / "model.safetensors"))
    tensors.pop("t2d")
    head.load_state_dict(tensors, strict=False)
    return head.eval()


def bench_model_config() -> dict[str, Any]:
    """build_tiny_model kwargs for a ~80M-parameter random Llama (tokenizer vocab 8192)."""
    return dict(
        family="llama",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=8192,
        max_position_embeddings=2048,
        initializer_range=0.02,
        tie_word_embeddings=False,
    )


def build_bench_model(out_dir: str | Path) -> Path:
    return build_tiny_model(out_dir, **bench_model_config())


# --------------------------------------------------------------------------- shapes without weights

def _gpt_oss_shape(hidden: int, layers: int, heads: int, kv_heads: int, experts: int, top_k: int, vocab: int,
                   max_positions: int) -> dict[str, Any]:
    """A GptOssForCausalLM config.json: head_dim 64, expert width = hidden, YaRN x32 over 4096."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
        "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 64, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "vocab_size": vocab, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5, "sliding_window": 128, "attention_bias": True, "swiglu_limit": 7.0,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "rope_theta": 150000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1,
    }


def _deepseek_v3_shape(hidden: int, layers: int, heads: int, dense_inter: int, experts: int, expert_inter: int,
                       q_lora: int, vocab: int) -> dict[str, Any]:
    """A DeepseekV3ForCausalLM config.json: DeepSeek-V3's latent widths (512 + 64, heads of 128 + 64
    and 128), routing (8 groups, top 4 groups, top 8, x2.5) and YaRN x40 over 4096."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
        "intermediate_size": dense_inter, "moe_intermediate_size": expert_inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": q_lora, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": experts,
        "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 8,
        "topk_group": 4, "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "vocab_size": vocab, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1,
    }


# Published model shapes for ``--load-format dummy`` benchmarks (config.json only; weights random).
DUMMY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "bench-88m": {**{k: v for k, v in bench_model_config().items() if k not in ("family", "initializer_range")},
                  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-6,
                  "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1},
    # Qwen3-30B-A3B's published shape: 128 experts, top 8, 3B of 30B parameters active per token
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1,
    },
    # the same proportions, small enough for a CPU benchmark: 32 experts, top 4, ~105M parameters
    "qwen3-moe-small": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 512,
        "intermediate_size": 1536, "moe_intermediate_size": 256, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 32,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 8192, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1,
    },
    # gpt-oss-20b's published shape: 32 experts, top 4, sinks, windows of 128 on every other layer
    "gpt-oss-20b": _gpt_oss_shape(hidden=2880, layers=24, heads=64, kv_heads=8, experts=32, top_k=4,
                                  vocab=201088, max_positions=131072),
    # the same attention and routing, small enough for a CPU benchmark: 16 experts, ~115M parameters
    "gpt-oss-small": _gpt_oss_shape(hidden=512, layers=8, heads=8, kv_heads=2, experts=16, top_k=4, vocab=8192,
                                    max_positions=4096),
    # DeepSeek-V3's published shape (671B, 37B active): MLA with a 512 + 64 latent, 256 experts in 8
    # groups (top 8 within 4 groups), one shared expert, the first 3 layers dense
    "deepseek-v3": _deepseek_v3_shape(hidden=7168, layers=61, heads=128, dense_inter=18432, experts=256,
                                      expert_inter=2048, q_lora=1536, vocab=129280),
    # the same attention and routing, small enough for a CPU benchmark: ~120M parameters
    "deepseek-v3-small": _deepseek_v3_shape(hidden=512, layers=8, heads=8, dense_inter=1536, experts=32,
                                            expert_inter=256, q_lora=192, vocab=8192),
}


def write_dummy_model(name: str, out_dir: str | Path) -> Path:
    """config.json of a DUMMY_CONFIGS shape plus this module's tokenizer (ids 0-2 special, the
    rest byte-level BPE; fewer ids than the model's vocabulary, which is fine for random prompts).
    Load it with ``load_format="dummy"``: there are no weights."""
    if name not in DUMMY_CONFIGS:
        raise ValueError(f"unknown dummy model {name!r}; expected one of {sorted(DUMMY_CONFIGS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").exists():
        build_tokenizer(out, 512)
    (out / "config.json").write_text(json.dumps(DUMMY_CONFIGS[name], indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.testing", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=sorted(PRESETS), help="named tiny preset")
    group.add_argument("--bench", action="store_true", help="~80M-parameter Llama for benchmarks")
    args = parser.parse_args(argv)
    if args.bench:
        path = build_bench_model(args.out_dir)
    elif args.preset:
        path = build_preset(args.preset, args.out_dir)
    else:
        path = build_tiny_model(args.out_dir)
    print(json.dumps({"path": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
