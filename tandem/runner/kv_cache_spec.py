"""What one KV cache block costs and holds, layer by layer.

NOTE: every layer has the same block size, number of blocks and block shape (the block pool is one
for all layers); only the element type may differ per layer (an FP8 cache with
``kv_cache_dtype_skip_layers`` keeps those layers in the model's dtype). A block's byte cost is the
sum over layers, so the budget -> block count arithmetic stays honest with mixed dtypes.

With ``values_share_keys`` (MLA) a layer has one cache tensor, bound as both K and V: a block costs
one tensor's bytes, not two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.config import CacheConfig
from tandem.kernels.kv_quant import is_fp8, resolve_cache_dtype


@dataclass(frozen=True)
class KVCacheSpec:
    block_size: int
    num_kv_heads: int
    head_dim: int
    layer_dtypes: tuple[torch.dtype, ...]  # one per attention layer, in layer order
    values_share_keys: bool = False

    @classmethod
    def build(cls, cfg: CacheConfig, model_dtype: torch.dtype, num_layers: int, num_kv_heads: int,
              head_dim: int, values_share_keys: bool = False) -> KVCacheSpec:
        """ValueError (naming the parameter) for a skipped layer index the model does not have."""
        bad = [i for i in cfg.kv_cache_dtype_skip_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"kv_cache_dtype_skip_layers: layer {bad[0]} out of range: the model has "
                             f"{num_layers} layers (0..{num_layers - 1})")
        cache_dtype = resolve_cache_dtype(cfg.cache_dtype, model_dtype)
        skip = set(cfg.kv_cache_dtype_skip_layers)
        dtypes = tuple(model_dtype if i in skip else cache_dtype for i in range(num_layers))
        return cls(cfg.block_size, num_kv_heads, head_dim, dtypes, values_share_keys)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return self.block_size, self.num_kv_heads, self.head_dim

    def layer_bytes_per_block(self, layer: int) -> int:
        """K or V of one block of one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * _element_size(self.layer_dtypes[layer])

    @property
    def tensors_per_layer(self) -> int:
        return 1 if self.values_share_keys else 2

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block over every layer."""
        return sum(self.tensors_per_layer * self.layer_bytes_per_block(i) for i in range(len(self.layer_dtypes)))

    def new_layer_cache(self, num_blocks: int, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, zeroed: two tensors, or one bound as both (``values_share_keys``)."""
        tensors = [torch.zeros((num_blocks, *self.block_shape), dtype=self.layer_dtypes[layer], device=device)
                   for _ in range(self.tensors_per_layer)]
        return tensors[0], tensors[-1]

    @property
    def quantized_layers(self) -> list[int]:
        return [i for i, d in enumerate(self.layer_dtypes) if is_fp8(d)]

    def describe(self) -> str:
        """'float8_e4m3fn', or 'float8_e4m3fn (float32 in layers 0, 3)' with skipped layers."""
        names = [str(d).removeprefix("torch.") for d in self.layer_dtypes]
        main = max(set(names), key=names.count)
        others = [i for i, n in enumerate(names) if n != main]
        if not others:
            return main
        return f"{main} ({names[others[0]]} in layers {', '.join(map(str, others))})"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
