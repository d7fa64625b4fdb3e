"""``EngineArgs``: every engine parameter, declared once (vLLM's name and module).

Each field carries its default, its help text and its validation. ``LLM(**kwargs)``, ``tandem serve``,
``tandem generate``, ``tandem bench throughput|latency`` and ``tandem eval perplexity`` all take their
engine parameters from here: ``EngineArgs.add_cli_args(parser)`` makes the flags (``--max-num-seqs``
for ``max_num_seqs``), ``EngineArgs.from_cli_args(args)`` reads them back, and
``create_engine_config()`` builds the ``EngineConfig`` the engine takes. Adding a parameter is one
new field here (plus its use in ``create_engine_config``).

Field metadata:
  help     the flag's help text (required)
  min      inclusive lower bound of a number (None passes where the type allows it)
  choices  allowed values, checked here and offered by the CLI
  cli_choices  choices the CLI offers but the Python API does not enforce (registries that code
           may extend, such as attention backends)
  check    value -> error text or None, for anything else
  cli_type the flag's argparse type when it is not the field's (a list read from one 'a,b' word),
           with its ``metavar``
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import numbers
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tandem.config import (
    KV_CACHE_DTYPES,
    CacheConfig,
    EngineConfig,
    KVOffloadConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_size,
)
from tandem.quantization.schemes import QUANTIZATION_METHODS

ModelFlag = Literal["positional", "option"] | None


def _power_of_two(v: int) -> str | None:
    return None if v & (v - 1) == 0 else "must be a power of two"


def _fraction(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _size(v: int | str) -> str | None:
    try:
        n = parse_size(v)
    except ValueError:
        return "cannot be parsed as a size (try '2GiB' or '512MiB')"
    return None if n >= 0 else "must be >= 0 bytes"


def _positive_ints(v: Sequence[int]) -> str | None:
    return None if all(x >= 1 for x in v) else "must all be >= 1"


def _layer_indices(v: Sequence[int]) -> str | None:
    return None if all(x >= 0 for x in v) else "must be layer indices >= 0"


def _comma_ints(text: str) -> list[int]:
    """CLI form of a list of ints: '0,31' (spaces allowed)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    """CLI form of a dict: a JSON object ('{"method": "ngram", "num_speculative_tokens": 3}')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _speculative(v: dict[str, Any]) -> str | None:
    try:
        SpeculativeConfig.from_dict(v)
    except (TypeError, ValueError) as e:
        return f"is invalid: {e}"
    return None


def _arg(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tandem-demo"


def default_model_path() -> str:
    """$TANDEM_MODEL, else the demo model bundled in the repository (models/tandem-demo)."""
    env = os.environ.get("TANDEM_MODEL")
    if env:
        return env
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return str(DEMO_MODEL_DIR)
    raise ValueError(f"no model given and the bundled demo model is missing ({DEMO_MODEL_DIR}): pass a Hugging "
                     "Face model directory (config.json, *.safetensors, tokenizer.json) or set TANDEM_MODEL")


@dataclass
class EngineArgs:
    # NOTE: a field that maps onto one config field takes its default from that config class, so the
    # default is written once; the config classes stay usable on their own (tests build them directly).
    # model
    model: str | None = _arg(
        None, "Hugging Face model directory (config.json, *.safetensors, tokenizer.json); "
              "default: $TANDEM_MODEL or the bundled models/tandem-demo")
    tokenizer: str | None = _arg(None, "tokenizer directory (default: the model directory)")
    dtype: str | torch.dtype = _arg(
        ModelConfig.dtype, "auto (float32 on CPU; on GPU the checkpoint's half type, else bfloat16), float32, "
                           "bfloat16, float16")
    max_model_len: int | None = _arg(
        ModelConfig.max_model_len, "longest prompt + output in tokens (default: the model's "
                                   "max_position_embeddings, capped to the KV cache)", min=1)
    seed: int = _arg(
        ModelConfig.seed, "random seed of the engine (dummy weights, sampling without a request seed); "
                          "in tandem bench also of the workload")
    device: str = _arg(ModelConfig.device, "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    load_format: str = _arg(
        ModelConfig.load_format, "auto: the directory's safetensors; dummy: random weights of config.json (no "
                                 "checkpoint needed; with dummy, tandem bench --model may also name a built-in "
                                 "shape such as llama-3.1-8b or bench-88m, written under .cache/dummy/)",
        choices=("auto", "dummy"))
    attention_backend: str = _arg(
        ModelConfig.attention_backend, "kernels: auto (Triton on a CUDA GPU; on a CPU the C++ paged decode "
                                       "attention where it builds, else torch), torch references, cpu, or Triton",
        cli_choices=("auto", "torch", "cpu", "triton"))
    cpu_gemm: str = _arg(
        ModelConfig.cpu_gemm, "fp32 linear layers on a CPU: auto (per weight shape and row count, the faster of "
                              "torch's BLAS and oneDNN with the weight packed once, measured at load), blas, onednn",
        choices=("auto", "blas", "onednn"))
    quantization: str | None = _arg(
        ModelConfig.quantization, "quantize the weights of every linear layer but the LM head when loading: fp8 "
                                  "(e4m3, per channel), int8 (weight-only, per channel), mxfp4, nvfp4 (emulated "
                                  "off Blackwell)", choices=QUANTIZATION_METHODS)
    precision_policy: str | None = _arg(
        ModelConfig.precision_policy, "YAML file of ordered rules (match -> scheme) choosing each linear layer's "
                                      "precision; see examples/policies/ (not with --quantization)")
    cpu_offload_gb: float = _arg(
        ModelConfig.cpu_offload_gb, "GiB of decoder-layer weights kept in pinned host memory and copied to the GPU one "
                                    "layer ahead of use, on a side stream (CUDA only; CUDA graphs off)", min=0.0)
    enforce_eager: bool = _arg(ModelConfig.enforce_eager, "no CUDA graphs for decode steps")
    cuda_graph_sizes: list[int] | None = _arg(
        ModelConfig.cuda_graph_sizes, "decode batch sizes replayed from CUDA graphs (default on CUDA: 1, 2, 4, 8, "
                                      "16, 32, ... up to max_num_seqs, at most 256); on a CPU only when given, "
                                      "and then run eagerly", check=_positive_ints)
    # cache
    block_size: int = _arg(CacheConfig.block_size, "tokens per KV cache block (a power of two)", min=1,
                           check=_power_of_two)
    enable_prefix_caching: bool = _arg(CacheConfig.enable_prefix_caching,
                                       "reuse the KV blocks of earlier prompts with the same prefix")
    kv_cache_memory: str | int | None = _arg(
        CacheConfig.kv_cache_memory, "KV cache size, e.g. 2GiB (CPU default 2GiB; GPU default: sized from "
                                     "--gpu-memory-utilization after a profile step)", check=_size)
    gpu_memory_utilization: float = _arg(
        CacheConfig.gpu_memory_utilization, "fraction of GPU memory for weights, activations and the KV cache",
        check=_fraction)
    num_gpu_blocks_override: int | None = _arg(
        CacheConfig.num_gpu_blocks_override, "exact number of KV cache blocks (mostly for tests)", min=0)
    kv_cache_dtype: str = _arg(
        CacheConfig.cache_dtype, "KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2: "
                                 "twice the tokens of a 16-bit cache (4x float32) in the same memory, for a small "
                                 "loss of precision; per-layer scales from the checkpoint's k_scale/v_scale, "
                                 "else 1.0, or --calculate-kv-scales", choices=KV_CACHE_DTYPES)
    calculate_kv_scales: bool = _arg(
        CacheConfig.calculate_kv_scales, "with an FP8 KV cache: set each layer's K and V scale from the first "
                                         "batch (absmax / FP8 max) and keep them (not with KV transfer)")
    kv_cache_dtype_skip_layers: list[int] | None = _arg(
        None, "layer indices whose KV cache keeps the model's dtype under an FP8 KV cache (CLI: 0,31)",
        check=_layer_indices, cli_type=_comma_ints, metavar="I,J")
    # KV offloading (tandem/kv_offload)
    kv_offloading_size: float | None = _arg(
        None, "GiB of host memory for a second KV tier: blocks of ended requests are copied there and a later "
              "prompt with the same prefix loads them back instead of recomputing (needs prefix caching)", min=0.0)
    kv_offloading_backend: str | None = _arg(
        None, "KV offloading implementation (default with --kv-offloading-size: native)", choices=("native",))
    kv_disk_path: str | None = _arg(
        None, "directory for a disk KV tier under the host tier (with --kv-offloading-size); blocks there "
              "survive a restart of the server")
    kv_disk_size: float = _arg(10.0, "GiB of the disk KV tier (with --kv-disk-path)", min=0.0)
    # scheduler
    max_num_batched_tokens: int | None = _arg(
        None, "per-step token budget shared by decodes and prefill chunks "
              f"(default {SchedulerConfig.max_num_batched_tokens})", min=1)
    max_num_seqs: int = _arg(SchedulerConfig.max_num_seqs, "most requests running at once", min=1)
    enable_chunked_prefill: bool = _arg(SchedulerConfig.enable_chunked_prefill,
                                        "split long prompts into chunks that fit the step's token budget")
    scheduling_policy: str = _arg(SchedulerConfig.policy, "fcfs, or priority (lower value first, as in vLLM)",
                                  choices=("fcfs", "priority"))
    async_scheduling: bool = _arg(SchedulerConfig.async_scheduling,
                                  "schedule step N+1 while the GPU runs step N (outputs arrive one step later)")
    # speculative decoding (tandem/spec_decode)
    speculative_config: dict[str, Any] | None = _arg(
        None, "speculative decoding as a JSON object, vLLM's keys: method (ngram, draft_model, "
              "eagle or eagle3), num_speculative_tokens (3), prompt_lookup_min (1) and prompt_lookup_max (4) for "
              "ngram, model (the draft model's or the EAGLE head's directory) for the others; tandem's adaptive "
              "(true): drafts per request and step chosen from the measured acceptance and step cost, down to none under load",
        check=_speculative, cli_type=_json_object, metavar="JSON")

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _validate(f, getattr(self, f.name), hints[f.name])

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, caller: str, **kwargs: Any) -> EngineArgs:
        """``cls(**kwargs)`` with a TypeError that names an unknown argument (and the nearest known one)."""
        known = cls.field_names()
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint} "
                                f"(engine arguments: {', '.join(known)})")
        return cls(**kwargs)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        """Keyword parameters mirroring the fields (for ``LLM.__init__.__signature__``)."""
        hints = typing.get_type_hints(cls)
        return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == "model"
                                  else inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
                for f in dataclasses.fields(cls)]

    # -- command line --------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model: ModelFlag = "option") -> argparse.ArgumentParser:
        """One flag per field (``--max-num-seqs``), in an "engine" group. ``model``: "positional"
        (``tandem serve [MODEL]``), "option" (``--model``, as vLLM's benchmarks) or None (the
        caller declares ``model`` itself, under that dest)."""
        group = parser.add_argument_group("engine (EngineArgs)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            shown = "" if f.default is None else " (default: %(default)s)"
            kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"] + shown}
            if f.name == "model":
                if model is None:
                    continue
                if model == "positional":
                    group.add_argument("model", nargs="?", **kwargs)
                    continue
            base, is_list = _cli_type(hints[f.name])
            if "cli_type" in f.metadata:
                kwargs.update(type=f.metadata["cli_type"], metavar=f.metadata.get("metavar"))
            elif base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = base
                if is_list:
                    kwargs.update(nargs="+", metavar="N")
            choices = f.metadata.get("choices") or f.metadata.get("cli_choices")
            if choices:
                kwargs["choices"] = choices
            group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{name: getattr(args, name) for name in cls.field_names()})

    # -- the engine's config objects -----------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        return EngineConfig(
            kv_offload=self._kv_offload_config(),
            speculative=(SpeculativeConfig.from_dict(self.speculative_config)
                         if self.speculative_config is not None else None),
            model=ModelConfig(model=str(self.model or default_model_path()), tokenizer=self.tokenizer,
                              dtype=self.dtype,  # type: ignore[arg-type]  # a torch.dtype passes through
                              max_model_len=self.max_model_len, seed=self.seed, device=self.device,
                              load_format=self.load_format, enforce_eager=self.enforce_eager,
                              cuda_graph_sizes=None if self.cuda_graph_sizes is None else list(self.cuda_graph_sizes),
                              attention_backend=self.attention_backend, cpu_gemm=self.cpu_gemm,
                              quantization=self.quantization, precision_policy=self.precision_policy,
                              cpu_offload_gb=self.cpu_offload_gb),
            cache=CacheConfig(block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
                              kv_cache_memory=self.kv_cache_memory,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              num_gpu_blocks_override=self.num_gpu_blocks_override,
                              cache_dtype=self.kv_cache_dtype, calculate_kv_scales=self.calculate_kv_scales,
                              kv_cache_dtype_skip_layers=list(self.kv_cache_dtype_skip_layers or [])),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens or SchedulerConfig.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs, enable_chunked_prefill=self.enable_chunked_prefill,
                policy=self.scheduling_policy, async_scheduling=self.async_scheduling),
        )

    def _kv_offload_config(self) -> KVOffloadConfig | None:
        if not self.kv_offloading_size:
            if self.kv_disk_path is not None:
                raise ValueError("kv_disk_path needs kv_offloading_size: the disk tier sits under the host tier")
            return None
        if not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size needs enable_prefix_caching: offloaded blocks are found by "
                             "their prefix hash")
        return KVOffloadConfig(host_bytes=int(self.kv_offloading_size * 2**30),
                               backend=self.kv_offloading_backend or "native",
                               disk_path=self.kv_disk_path, disk_bytes=int(self.kv_disk_size * 2**30))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly values (results files record the flags a run used)."""
        return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- validation
def _members(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _cli_type(hint: Any) -> tuple[Callable[[str], Any], bool]:
    """The argparse type of a field: its first non-None member (a list's element type, nargs '+')."""
    first = next(m for m in _members(hint) if m is not type(None))
    if typing.get_origin(first) is list:
        return typing.get_args(first)[0], True
    return first, False


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        (elem,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_is_instance(v, elem) for v in value)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = []
    for m in _members(hint):
        if m is type(None):
            names.append("None")
        elif typing.get_origin(m) is list:
            names.append(f"a list of {typing.get_args(m)[0].__name__}")
        else:
            names.append(m.__name__ if m.__module__ == "builtins" else f"{m.__module__}.{m.__name__}")
    return " or ".join(names)


def _validate(f: dataclasses.Field, value: Any, hint: Any) -> None:
    """TypeError / ValueError naming the parameter."""
    if not any(_is_instance(value, m) for m in _members(hint)):
        raise TypeError(f"{f.name} must be {_type_name(hint)}, got {value!r}")
    if value is None:
        return
    meta = f.metadata
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"{f.name} must be >= {meta['min']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
    if "check" in meta and (problem := meta["check"](value)):
        raise ValueError(f"{f.name} {problem}, got {value!r}")
