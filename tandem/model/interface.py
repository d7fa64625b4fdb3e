"""What the runner needs from a model (``load_model`` returns it; ``LlamaForCausalLM`` is one)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from tandem.model.attention import AttentionMetadata


class ModelArgs(Protocol):
    """The shape facts the runner sizes the KV cache and the sampler from."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def values_share_keys(self) -> bool:
        """True: one cache tensor per layer, bound as both K and V (MLA's latent rows)."""
        ...


class AttentionLayer(Protocol):
    """One attention layer's KV cache, bound by the runner: [num_blocks, block_size, kv_heads, head_dim]."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor  # fp32 [1]: an FP8 cache holds k / k_scale (tandem/kernels/kv_quant.py)
    v_scale: torch.Tensor
    calibrate_kv_scales: bool  # True: the next forward sets the scales from its own K/V


class CausalLM(Protocol):
    @property
    def args(self) -> ModelArgs: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the flat batch (``nn.Module.__call__`` -> ``forward``)."""
        ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> float32 logits [rows, padded vocab]."""
        ...

    def attention_layers(self) -> Sequence[AttentionLayer]:
        """The layers whose KV caches the runner allocates and binds, in layer order."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """``nn.Module.parameters`` (benchmarks count them)."""
        ...

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (parameter name, shard id or None); None: not a weight of ours."""
        ...
