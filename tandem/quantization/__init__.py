"""Precision as a policy: per-layer weight schemes applied to a loaded model.

``apply_precision(model, policy)`` resolves the policy against the model's linear layers
(``policy.py``), replaces each chosen layer's matmul with a ``QuantizedWeight`` (``schemes.py``)
and frees the float weight it replaces. The runner calls it once, after loading and before the
CPU GEMM plan (which then skips the quantized layers).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.quantization.policy import LM_HEAD, LayerPrecision, LayerRef, PrecisionPolicy
from tandem.quantization.schemes import QUANTIZATION_METHODS, SCHEMES, Int8Weight, QuantizedWeight, quantize_weight

if TYPE_CHECKING:
    from tandem.model.layers import Linear, VocabEmbedding

__all__ = ["QUANTIZATION_METHODS", "SCHEMES", "PrecisionPolicy", "PrecisionReport", "apply_precision",
           "checkpoint_precision", "linear_layers", "load_policy", "model_weight_bytes", "plan_int8_routes"]

logger = logging.getLogger(__name__)


@dataclass
class PrecisionReport:
    source: str
    layers: list[LayerPrecision]
    weight_bytes_before: int
    weight_bytes_after: int

    def schemes(self) -> dict[str, str]:
        return {layer.name: layer.scheme or "model dtype" for layer in self.layers}

    def table(self) -> str:
        width = max((len(layer.name) for layer in self.layers), default=0)
        lines = [f"precision policy {self.source}: weights {self.weight_bytes_before / 2**20:.1f} MiB -> "
                 f"{self.weight_bytes_after / 2**20:.1f} MiB"]
        lines += [f"  {layer.name:<{width}}  {layer.scheme or 'model dtype':<11}  {layer.reason}"
                  for layer in self.layers]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after,
                "layers": [{"name": layer.name, "kind": layer.kind, "scheme": layer.scheme, "reason": layer.reason}
                           for layer in self.layers]}


def load_policy(quantization: str | None, precision_policy: str | None) -> PrecisionPolicy | None:
    if quantization and precision_policy:
        raise ValueError("give quantization or precision_policy, not both (a policy file can say "
                         "match: '*' for the whole model)")
    if precision_policy:
        return PrecisionPolicy.from_file(precision_policy)
    if quantization:
        return PrecisionPolicy.from_quantization(quantization)
    return None


def _kind(name: str) -> str:
    if ".experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def linear_layers(model: nn.Module) -> dict[str, tuple[LayerRef, Linear | VocabEmbedding]]:
    """Every Linear by module name, and the LM head as ``lm_head`` (even when tied to the embeddings)."""
    from tandem.model.layers import Linear, ShardedLinear, VocabEmbedding

    stacked: dict[str, tuple[str, object]] = getattr(model, "stacked_params", {})
    found: dict[str, tuple[LayerRef, Linear | VocabEmbedding]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        parts: tuple[str, ...] = ()
        if isinstance(module, ShardedLinear):
            dotted = f".{name}."
            parts = tuple(dotted.replace(fused, frag).strip(".") for frag, (fused, _) in stacked.items()
                          if fused in dotted)
        found[name] = (LayerRef(name, _kind(name), _in_features(module), parts), module)
    lm_head = getattr(model, LM_HEAD, None)
    if isinstance(lm_head, VocabEmbedding):
        found[LM_HEAD] = (LayerRef(LM_HEAD, LM_HEAD, _in_features(lm_head)), lm_head)
    return found


def _in_features(module: Linear | VocabEmbedding) -> int:
    return module.quant.in_features if module.quant is not None else module.weight.shape[1]


@torch.no_grad()
def apply_precision(model: object, policy: PrecisionPolicy) -> PrecisionReport:
    assert isinstance(model, nn.Module)
    layers = linear_layers(model)
    before = model_weight_bytes(model)
    resolved = policy.resolve([ref for ref, _ in layers.values()])
    # a weight reachable under two names (a tied LM head's, which the embeddings also read) is kept
    names_per_weight = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for layer in resolved:
        if layer.scheme is None:
            continue
        module = layers[layer.name][1]
        weight = module.weight
        quantized = quantize_weight(weight, layer.scheme)
        module.quant = quantized
        if names_per_weight[id(weight)] == 1:
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)  # freed: quant holds it now
    report = PrecisionReport(policy.source, resolved, before, model_weight_bytes(model))
    logger.info("%s", report.table())
    return report


def plan_int8_routes(model: object, dtype: torch.dtype) -> None:
    """On a CPU, give every int8 weight (a fused layer's parts too) the fastest path per row count,
    timed once per weight shape."""
    assert isinstance(model, nn.Module)
    routes: dict = {}
    for module in model.modules():
        if isinstance(module, Int8Weight):
            module.measure_cpu_routes(routes, dtype)


def checkpoint_precision(model: object, source: str) -> PrecisionReport:
    """The report of a model whose layers a pre-quantized checkpoint chose (``before``: the same
    layers in the model's dtype)."""
    assert isinstance(model, nn.Module)
    layers, float_bytes = [], 0
    for ref, module in linear_layers(model).values():
        quant = module.quant
        layers.append(LayerPrecision(ref.name, ref.kind, quant.scheme if quant else None, source))
        if quant is not None:
            float_bytes += quant.out_features * quant.in_features * module.weight.element_size() - quant.nbytes
    after = model_weight_bytes(model)
    report = PrecisionReport(source, layers, after + float_bytes, after)
    logger.info("%s", report.table())
    return report


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (the embeddings and norms included) and every quantized weight."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedWeight))
    return params + quantized
