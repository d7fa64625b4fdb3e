"""Pre-quantized checkpoints, loaded as they ship (``quantization_config`` in config.json).

* compressed-tensors (llm-compressor's format): ``config_groups`` of ``targets`` with weight
  arguments, plus ``ignore``. Supported weights: FP8 (``type: float``, 8 bits; ``tensor``,
  ``channel`` or 128x128 ``block`` scales) stored as ``weight`` + ``weight_scale``; INT8
  (``type: int``, 8 bits, symmetric, ``tensor``/``channel``) the same; INT4 W4A16 (``type: int``,
  4 bits, symmetric, ``group``/``channel``) as ``pack-quantized`` ``weight_packed`` (eight
  offset-by-8 codes per int32) + ``weight_scale`` + ``weight_shape``. Activation quantization in
  a checkpoint (W8A8) is honoured as dynamic per-token FP8 on a GPU (static input scales are not
  used; logged), and activations stay unquantized on a CPU.
* ``quant_method: fp8`` with ``weight_block_size: [128, 128]`` (DeepSeek-V3 style): ``weight``
  in e4m3 and ``weight_scale_inv`` per block (the factor that dequantizes).
* ``quant_method: mxfp4`` (gpt-oss as OpenAI ships it): each fused expert tensor as
  ``<name>_blocks`` [E, rows, K/32, 16] (E2M1 codes, two per byte, low nibble first) and
  ``<name>_scales`` [E, rows, K/32] (E8M0), everything else in bf16. The experts are dequantized at
  load into the model's float type (``Mxfp4Experts``): exact, but they take 4x their checkpoint's
  memory in bf16, as no MXFP4 MoE kernel runs them packed yet.

The loader hands every tensor of a quantized module (``<module>.weight``, ``.weight_scale``,
...) to ``CheckpointQuantization.take``; once the files are read, ``build`` turns each module's
tensors into a ``QuantizedWeight`` without requantizing, so the loaded model computes exactly
the checkpoint's dequantized weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tandem.kernels import quant as Q
from tandem.quantization.schemes import ConcatWeight, Fp8Weight, Int4Weight, Int8Weight, QuantizedWeight

logger = logging.getLogger(__name__)

# the per-module tensors a quantized checkpoint stores beside (or instead of) ``weight``
QUANT_FIELDS = ("weight", "weight_scale", "weight_scale_inv", "weight_packed", "weight_shape",
                "weight_zero_point", "weight_g_idx", "input_scale")
# a module is quantized in the checkpoint exactly when one of these is stored for it
SCALE_FIELDS = ("weight_scale", "weight_scale_inv", "weight_packed")


@dataclass(frozen=True)
class WeightFormat:
    """How one group of a checkpoint stores its weights."""
    kind: str  # "fp8", "int8", "int4"
    strategy: str  # "tensor", "channel", "block", "group"
    bits: int = 8


@dataclass
class CheckpointQuantization:
    method: str  # "compressed-tensors" or "fp8"
    groups: list[tuple[list[str], WeightFormat]]  # (targets, format), first match wins
    ignore: list[str] = field(default_factory=list)
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> field -> tensor
    quantized: set[str] = field(default_factory=set)  # checkpoint modules with scales (set by scan)

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> CheckpointQuantization | None:
        cfg = hf_config.get("quantization_config")
        if not cfg:
            return None
        method = cfg.get("quant_method")
        if method == "compressed-tensors":
            return cls(method, [_compressed_group(name, g) for name, g in (cfg.get("config_groups") or {}).items()],
                       list(cfg.get("ignore") or []))
        if method == "fp8":
            return cls(method, [(["Linear"], _fp8_block_format(cfg))],
                       list(cfg.get("modules_to_not_convert") or cfg.get("ignored_layers") or []))
        if method == "mxfp4":
            return Mxfp4Experts(method, [])
        raise NotImplementedError(f"quantization_config quant_method {method!r} is not supported "
                                  "(compressed-tensors, fp8 and mxfp4 are)")

    def dequantized(self, model: object) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors stored quantized that the model takes in float, as (checkpoint name,
        float tensor), once every file is read, one module at a time (each freed once loaded); the
        loader loads them as if stored so. Here: the quantized modules whose weight is not a linear
        layer's (fused experts, MLA's kv_b_proj in DeepSeek-V3's FP8 checkpoints); ``attach`` keeps
        the rest quantized. Modules the model skips (``map_checkpoint_name`` None: DeepSeek-V3's
        multi-token-prediction layer) are dropped."""
        from tandem.model.layers import Linear, VocabEmbedding

        assert isinstance(model, torch.nn.Module)
        modules = dict(model.named_modules())
        for ckpt_module in list(self.pending):
            mapped = model.map_checkpoint_name(ckpt_module + ".weight")  # type: ignore[operator]
            if mapped is None:
                del self.pending[ckpt_module]
            elif not isinstance(modules.get(mapped[0].removesuffix(".weight")), (Linear, VocabEmbedding)):
                yield ckpt_module + ".weight", self.build(ckpt_module).dequantize()

    def format_of(self, module: str) -> WeightFormat | None:
        """The format of a checkpoint module (``model.layers.0.self_attn.q_proj``), None if unquantized."""
        if any(_target_matches(t, module) for t in self.ignore):
            return None
        return next((fmt for targets, fmt in self.groups if any(_target_matches(t, module) for t in targets)), None)

    def scan(self, names: list[str]) -> None:
        """Note which modules the checkpoint quantized (those with scales) before any tensor is read;
        a quantized module that no config group targets is an error."""
        for name in names:
            module, _, leaf = name.rpartition(".")
            if leaf in SCALE_FIELDS:
                if self.format_of(module) is None:
                    raise ValueError(f"checkpoint module {module} is stored quantized ({leaf}) but no group of the "
                                     f"{self.method} quantization_config targets it")
                self.quantized.add(module)

    def wants(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to a quantized module (then ``take`` it, not the float loader)."""
        module, _, leaf = name.rpartition(".")
        return leaf in QUANT_FIELDS and module in self.quantized

    def take(self, name: str, tensor: torch.Tensor) -> None:
        module, _, leaf = name.rpartition(".")
        self.pending.setdefault(module, {})[leaf] = tensor

    def build(self, module: str) -> QuantizedWeight:
        fmt = self.format_of(module)
        assert fmt is not None, "only modules take() accepted are pending"
        tensors = self.pending.pop(module)
        try:
            return _build(fmt, tensors, self.method)
        except KeyError as e:
            raise ValueError(f"checkpoint module {module}: {fmt.kind} weights need tensor {module}.{e.args[0]}") from e


    def attach(self, model: object) -> set[tuple[int, object]]:
        """Give every pending module's layer its QuantizedWeight (a fused layer its parts, in
        shard order) and free the float weight it replaces. Returns the (parameter id, shard)
        pairs now loaded, for the loader's completeness check."""
        from tandem.model.layers import Linear, ShardedLinear, VocabEmbedding

        assert isinstance(model, torch.nn.Module)
        modules = dict(model.named_modules())
        parts: dict[str, dict[object, QuantizedWeight]] = {}
        for ckpt_module in list(self.pending):
            mapped = model.map_checkpoint_name(ckpt_module + ".weight")  # type: ignore[operator]
            assert mapped is not None, "dequantized() dropped the modules the model skips"
            parts.setdefault(mapped[0].removesuffix(".weight"), {})[mapped[1]] = self.build(ckpt_module)
        loaded: set[tuple[int, object]] = set()
        for name, by_shard in parts.items():
            layer = modules.get(name)
            if not isinstance(layer, (Linear, VocabEmbedding)):
                raise ValueError(f"checkpoint tensors for {name} are quantized, but it is not a linear layer")
            order = list(layer.shard_offsets) if isinstance(layer, ShardedLinear) else [None]
            missing = [s for s in order if s not in by_shard]
            if missing:
                raise ValueError(f"checkpoint is missing the quantized parts {missing} of {name}")
            quant = by_shard[None] if order == [None] else ConcatWeight([by_shard[s] for s in order])
            if (quant.out_features, quant.in_features) != tuple(layer.weight.shape):
                raise ValueError(f"{name}: quantized weight of shape {(quant.out_features, quant.in_features)} "
                                 f"does not fit {tuple(layer.weight.shape)}")
            layer.quant = quant.to(layer.weight.device)
            loaded |= {(id(layer.weight), shard) for shard in order}
            layer.weight.data = torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device)
        return loaded


MXFP4_PARTS = ("_blocks", "_scales")


class Mxfp4Experts(CheckpointQuantization):
    """gpt-oss's MXFP4 experts (module docstring): ``<name>_blocks`` + ``<name>_scales`` -> the float
    ``<name>`` in the layout gpt-oss's bf16 checkpoints store ([E, K, rows]), which the experts'
    loader takes (tandem/model/moe.py)."""

    def scan(self, names: list[str]) -> None:
        pass  # nothing to note before reading: every _blocks / _scales tensor is taken

    def wants(self, name: str) -> bool:
        return name.endswith(MXFP4_PARTS) and ".mlp.experts." in name

    def take(self, name: str, tensor: torch.Tensor) -> None:
        base, part = name[:-len("_blocks")], name[-len("_blocks"):]  # both suffixes are 7 characters
        self.pending.setdefault(base, {})[part] = tensor

    def dequantized(self, model: object) -> Iterator[tuple[str, torch.Tensor]]:
        for base in sorted(self.pending):
            parts = self.pending.pop(base)
            missing = [base + p for p in MXFP4_PARTS if p not in parts]
            if missing:
                raise ValueError(f"mxfp4 checkpoint is missing {', '.join(missing)}")
            yield base, dequantize_mxfp4_experts(parts["_blocks"], parts["_scales"])

    def attach(self, model: object) -> set[tuple[int, object]]:
        return set()  # nothing stays quantized: dequantized() handed everything to the float loader


def dequantize_mxfp4_experts(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, rows, K/32, 16] uint8 codes + [E, rows, K/32] uint8 exponents -> fp32 [E, K, rows]."""
    if blocks.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != Q.MX_BLOCK // 2:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} ({blocks.dtype}) and scales {tuple(scales.shape)} do "
                         f"not pair: expected [E, rows, K/32, 16] uint8 and [E, rows, K/32]")
    e, rows, groups, _ = blocks.shape
    flat = Q.dequantize_mxfp4(blocks.reshape(e * rows, groups * Q.MX_BLOCK // 2), scales.reshape(e * rows, groups))
    return flat.view(e, rows, groups * Q.MX_BLOCK).transpose(1, 2)


def _target_matches(target: str, module: str) -> bool:
    """compressed-tensors targets: a layer class (every linear layer here is a ``Linear``; the LM
    head too), ``re:`` a regular expression matched from the start, or a module name."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def _compressed_group(name: str, group: dict) -> tuple[list[str], WeightFormat]:
    w = group.get("weights") or {}
    bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
    where = f"compressed-tensors group {name!r}"
    if not w.get("symmetric", True):
        raise NotImplementedError(f"{where}: asymmetric weights (zero points) are not supported")
    if w.get("actorder"):
        raise NotImplementedError(f"{where}: activation-ordered groups (g_idx) are not supported")
    if kind == "float" and bits == 8 and strategy in ("tensor", "channel", "block"):
        if strategy == "block" and list(w.get("block_structure") or []) != [Q.FP8_BLOCK, Q.FP8_BLOCK]:
            raise NotImplementedError(f"{where}: fp8 blocks must be {Q.FP8_BLOCK}x{Q.FP8_BLOCK}")
        fmt = WeightFormat("fp8", strategy)
    elif kind == "int" and bits == 8 and strategy in ("tensor", "channel"):
        fmt = WeightFormat("int8", strategy)
    elif kind == "int" and bits == 4 and strategy in ("group", "channel"):
        fmt = WeightFormat("int4", strategy, bits=4)
    else:
        raise NotImplementedError(f"{where}: {kind} {bits}-bit weights with {strategy!r} scales are not supported "
                                  "(fp8 tensor/channel/block, int8 tensor/channel, int4 group/channel are)")
    acts = group.get("input_activations")
    if acts and not acts.get("dynamic", False):
        logger.info("%s: static input scales are not used; activations are quantized per token on a GPU", where)
    return list(group.get("targets") or []), fmt


def _fp8_block_format(cfg: dict) -> WeightFormat:
    block = cfg.get("weight_block_size")
    if list(block or []) != [Q.FP8_BLOCK, Q.FP8_BLOCK]:
        raise NotImplementedError(f"fp8 checkpoints need weight_block_size [{Q.FP8_BLOCK}, {Q.FP8_BLOCK}], "
                                  f"got {block}")
    if cfg.get("fmt", "e4m3") != "e4m3":
        raise NotImplementedError(f"fp8 checkpoints in {cfg.get('fmt')!r} are not supported (e4m3 is)")
    return WeightFormat("fp8", "block")


def _per_channel(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A tensor-wide or per-channel scale ([], [1], [N] or [N, 1]) as [N] fp32."""
    flat = scale.float().reshape(-1)
    return flat.expand(rows).clone() if flat.numel() == 1 else flat


def _build(fmt: WeightFormat, t: dict[str, torch.Tensor], method: str) -> QuantizedWeight:
    if fmt.kind == "int4":
        return _build_int4(t)
    if fmt.kind == "int8":
        # weight-only int8 (W8A16) ships pack-quantized (four codes per int32); W8A8 as plain int8
        q = _unpack_int32(t["weight_packed"], 8, t["weight_shape"]) if "weight_packed" in t else t["weight"]
        if q.dtype != torch.int8:
            raise ValueError(f"int8 weights stored as {q.dtype}")
        return Int8Weight(q, _per_channel(t["weight_scale"], q.shape[0]))
    q = t["weight"]
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8 weights stored as {q.dtype} (float8_e4m3fn expected)")
    if fmt.strategy == "block":
        scale = t["weight_scale_inv"] if method == "fp8" else t["weight_scale"]
        expected = (-(-q.shape[0] // Q.FP8_BLOCK), -(-q.shape[1] // Q.FP8_BLOCK))
        if tuple(scale.shape) != expected:
            raise ValueError(f"block scales of shape {tuple(scale.shape)}, expected {expected}")
        return Fp8Weight(q, scale.float())
    return Fp8Weight(q, _per_channel(t["weight_scale"], q.shape[0]))


def _unpack_int32(packed: torch.Tensor, bits: int, shape: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack-quantized layout: 32 // bits codes per int32 along K, the first in
    the lowest bits, each offset by 2 ** (bits - 1) -> the signed codes [N, K] as int8."""
    rows, cols = (int(v) for v in shape.tolist())
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :cols]
    return (codes - (1 << (bits - 1))).to(torch.int8)


def _build_int4(t: dict[str, torch.Tensor]) -> Int4Weight:
    q = _unpack_int32(t["weight_packed"], 4, t["weight_shape"])
    rows, cols = q.shape
    codes = (q + 8).to(torch.uint8)
    if cols % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=8)  # an int4 zero pads the odd column
    return Int4Weight(Q.pack_fp4(codes), t["weight_scale"].float().reshape(rows, -1), cols)
