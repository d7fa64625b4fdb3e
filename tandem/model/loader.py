"""Load a Hugging Face model directory (config.json + *.safetensors): local files only."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from tandem.model.attention import AttentionBackend
from tandem.model.interface import CausalLM
from tandem.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from tandem.quantization.checkpoint import CheckpointQuantization

# HF ``architectures`` entry -> (model class, family flag)
MODEL_REGISTRY: dict[str, tuple[type, str]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, "llama"),
    "MistralForCausalLM": (LlamaForCausalLM, "mistral"),
    "Qwen2ForCausalLM": (LlamaForCausalLM, "qwen2"),
    "Qwen3ForCausalLM": (LlamaForCausalLM, "qwen3"),
    "Qwen3MoeForCausalLM": (LlamaForCausalLM, "qwen3_moe"),
    "MixtralForCausalLM": (LlamaForCausalLM, "mixtral"),
    "Glm4MoeForCausalLM": (LlamaForCausalLM, "glm4_moe"),
    "GptOssForCausalLM": (LlamaForCausalLM, "gpt_oss"),
    "DeepseekV2ForCausalLM": (LlamaForCausalLM, "deepseek_v2"),
    "DeepseekV3ForCausalLM": (LlamaForCausalLM, "deepseek_v3"),
}

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    return json.loads(path.read_text())


def resolve_dtype(requested: str | torch.dtype, hf_config: dict, device: torch.device) -> torch.dtype:
    """'auto' -> float32 on CPU; on GPU the checkpoint's half type, else bfloat16."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"dtype: unknown {requested!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    config_dtype = _DTYPES.get(str(hf_config.get("dtype") or hf_config.get("torch_dtype") or ""))
    return config_dtype if config_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def get_model_class(hf_config: dict) -> tuple[type, str]:
    for arch in hf_config.get("architectures") or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architectures {hf_config.get('architectures')}; "
                     f"supported: {sorted(MODEL_REGISTRY)}")


LOAD_FORMATS = ("auto", "dummy")


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               backend: AttentionBackend, load_format: str = "auto", seed: int = 0,
               prequantized: CheckpointQuantization | None = None) -> CausalLM:
    """load_format auto: the directory's safetensors; dummy: random weights of its config.json
    (benchmarks of a model's shape without its checkpoint, as vLLM's ``--load-format dummy``).
    prequantized: what the checkpoint's ``quantization_config`` says (read by the caller)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    hf_config = read_hf_config(model_dir)
    cls, family = get_model_class(hf_config)
    with torch.device(device):
        model = cls(hf_config, family, dtype, backend)
    if load_format == "dummy":
        if prequantized:
            raise ValueError(f"{model_dir}: load_format dummy cannot fill a pre-quantized checkpoint's layers "
                             f"({prequantized.method})")
        init_dummy_weights(model, seed)
    else:
        load_weights(model, model_dir, prequantized)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02): activations stay finite in half precision."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def load_weights(model: CausalLM, model_dir: str | Path, prequantized: CheckpointQuantization | None = None) -> None:
    """Stream every tensor of every safetensors file through its parameter's ``weight_loader``;
    the tensors of a pre-quantized checkpoint's quantized modules become their layers'
    ``QuantizedWeight`` instead (tandem/quantization/checkpoint.py).

    Strict: a checkpoint tensor with no parameter, a tensor of the wrong shape, and a parameter
    shard (q/k/v, gate/up, or a whole tensor) that no file supplied each fail with the names."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    _check_index(Path(model_dir), files)
    assert isinstance(model, nn.Module)
    params = dict(model.named_parameters(remove_duplicate=False))
    scales = kv_scale_buffers(model)  # optional: a checkpoint without them keeps 1.0
    loaded: set[tuple[int, object]] = set()  # (id of the parameter, shard id): tied names share one
    if prequantized is not None:
        prequantized.scan([name for file in files for name in checkpoint_keys(file)])

    def load(file: str, name: str, get: Callable[[], torch.Tensor]) -> None:
        mapped = model.map_checkpoint_name(name)
        if mapped is None:
            return
        target, shard = mapped
        if target in scales:
            _load_kv_scale(file, name, scales[target], get())
            return
        if target not in params:
            raise ValueError(f"{file}: checkpoint tensor {name!r} has no matching parameter")
        param = params[target]
        try:
            _load_one(param, get(), shard)
        except ValueError as e:
            raise ValueError(f"{file}: checkpoint tensor {name!r}: {e}") from e
        loaded.update((id(param), s) for s in _loaded_shards(param, shard))

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if prequantized is not None and prequantized.wants(name):
                    prequantized.take(name, f.get_tensor(name))
                else:
                    load(file.name, name, functools.partial(f.get_tensor, name))
    if prequantized is not None:
        for name, tensor in prequantized.dequantized(model):
            load(f"{prequantized.method} checkpoint", name, functools.partial(_same, tensor))
        loaded |= prequantized.attach(model)
    _check_all_loaded(model, params, loaded)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _check_index(model_dir: Path, files: list[Path]) -> None:
    """A sharded checkpoint's ``model.safetensors.index.json`` names its files: one missing is named."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return
    wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
    missing = sorted(wanted - {f.name for f in files})
    if missing:
        raise FileNotFoundError(f"{model_dir}: the checkpoint index lists {', '.join(missing)}, which is missing")


def checkpoint_keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def kv_scale_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attention layers' FP8 KV cache scales (``...self_attn.k_scale`` / ``v_scale``) by name."""
    return {name: buf for name, buf in model.named_buffers() if name.endswith((".k_scale", ".v_scale"))}


def _load_kv_scale(file: str, name: str, buf: torch.Tensor, tensor: torch.Tensor) -> None:
    """A per-tensor scale: one positive finite value (per-head or per-channel scales are refused)."""
    if tensor.numel() != 1:
        raise ValueError(f"{file}: checkpoint tensor {name!r}: a KV cache scale must be one value per layer "
                         f"(per-tensor), got shape {tuple(tensor.shape)}")
    value = tensor.reshape(1).float()
    if not (torch.isfinite(value).all() and (value > 0).all()):
        raise ValueError(f"{file}: checkpoint tensor {name!r}: a KV cache scale must be positive and finite, "
                         f"got {value.item()}")
    buf.copy_(value)


def _loaded_shards(param: nn.Parameter, shard: object) -> list[object]:
    """The shards one checkpoint tensor fills: its own, or every one when a fused parameter (fused
    experts) takes its whole tensor at once (``whole_fills_shards``)."""
    if shard is None and getattr(param, "whole_fills_shards", False):
        return list(param.shard_ids)  # type: ignore[attr-defined]
    return [shard]


def _load_one(param: nn.Parameter, tensor: torch.Tensor, shard: object) -> None:
    if shard not in getattr(param, "shard_ids", (None,)) and not (shard is None and
                                                                   getattr(param, "whole_fills_shards", False)):
        raise ValueError(f"shard {shard!r} is not one of the parameter's {param.shard_ids}")  # type: ignore[attr-defined]
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        raise ValueError(f"stored as {tensor.dtype}, a quantized form, without the scales that would dequantize it "
                         "(weight_scale / weight_scale_inv / weight_packed) or a quantization_config naming them")
    tensor = tensor.to(param.dtype)
    if shard is None:
        param.weight_loader(param, tensor)  # type: ignore[attr-defined]
    else:
        param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]


def _check_all_loaded(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[tuple[int, object]]) -> None:
    """Every shard of every parameter (each tied parameter once) came from the checkpoint."""
    missing: list[str] = []
    seen: set[int] = set()
    for name, param in params.items():
        if id(param) in seen:
            continue
        seen.add(id(param))
        missing += [_checkpoint_name(model, name, shard) for shard in getattr(param, "shard_ids", (None,))
                    if (id(param), shard) not in loaded]
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}{more}")


def _checkpoint_name(model: nn.Module, param_name: str, shard: object) -> str:
    """Our parameter name (and shard) -> the checkpoint tensor name that should have filled it."""
    if shard is None:
        return param_name
    if isinstance(shard, tuple):  # one expert's part of fused expert weights (tandem/model/moe.py)
        expert, part = shard
        return f"{param_name.rsplit('.', 1)[0]}.{expert}.{part}_proj.weight"
    for frag, (fused, shard_id) in getattr(model, "stacked_params", {}).items():
        if shard_id == shard and fused in param_name:
            return param_name.replace(fused, frag)
    return f"{param_name} (shard {shard!r})"
