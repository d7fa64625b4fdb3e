"""EAGLE-1 heads (speculative decoding, ``speculative_config`` method ``eagle``) in the checkpoint
layout vLLM loads as ``EagleLlamaForCausalLM``: ``fc.weight`` [hidden, 2 x hidden] (``fc.bias``
optional), then ``layers.N.*`` Llama decoder layers (the first without its input norm; a stored
``layers.0.input_layernorm.weight`` is unused, as in vLLM), and no final norm. ``embed_tokens.weight``
and ``lm_head.weight`` are optional: a head without them uses the target's.

At position t the head reads the embedding of token t + 1 and the target's final hidden state f_t
(after its final norm) and predicts f_{t+1}; the LM head turns a prediction into a draft token, and
the prediction is the next position's feature when drafting goes on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tandem.model.attention import AttentionBackend, AttentionMetadata
from tandem.model.interface import CausalLM
from tandem.model.layers import Linear, VocabEmbedding
from tandem.model.llama import Attention, DecoderLayer, LlamaArgs, LlamaForCausalLM
from tandem.model.loader import checkpoint_keys, load_weights, read_hf_config

EAGLE3_MARKERS = ("midlayer.", "d2t", "t2d")  # EAGLE-3 heads (method eagle3): not served yet


class EagleLlamaHead(nn.Module):
    def __init__(self, hf_config: dict, dtype: torch.dtype, backend: AttentionBackend, target: CausalLM,
                 stored: set[str]) -> None:
        """stored: the checkpoint's tensor names (which optional parts the head has)."""
        super().__init__()
        self.args = a = LlamaArgs.from_hf(hf_config, "llama")
        self.fc = Linear(2 * a.hidden_size, a.hidden_size, bias="fc.bias" in stored, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(a, dtype, backend, i, input_norm=i > 0) for i in range(a.num_layers))
        self.embed_tokens = (VocabEmbedding(a.vocab_size, a.hidden_size, dtype)
                             if "embed_tokens.weight" in stored else None)
        self.lm_head = VocabEmbedding(a.vocab_size, a.hidden_size, dtype) if "lm_head.weight" in stored else None
        self._target = (target,)  # a tuple: the target's embeddings and LM head are not the head's parameters

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids[i]: the token after position positions[i]; features[i]: the target's (or the
        head's own previous) feature at that position. Returns the predicted next features."""
        embed = self.embed_tokens if self.embed_tokens is not None else self._target[0].model.embed_tokens  # type: ignore[attr-defined]
        h = self.fc(torch.cat([embed(input_ids), features], dim=-1))
        for layer in self.layers:
            h = layer(positions, h, meta)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.logits(hidden).float()
        return self._target[0].compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        layers = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)  # the head holds nothing else
            layers.append(layer.self_attn)
        return layers

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        name = name.removeprefix("model.")
        if name == "layers.0.input_layernorm.weight" or "rotary_emb.inv_freq" in name:
            return None
        for frag, (fused, shard) in LlamaForCausalLM.stacked_params.items():
            if frag in name:
                return name.replace(frag, fused), shard
        return name, None


def load_eagle_head(head_dir: str | Path, target: CausalLM, dtype: torch.dtype, device: torch.device,
                    backend: AttentionBackend) -> EagleLlamaHead:
    """The head in ``head_dir`` over ``target``; a head that does not fit the target is an error
    naming what differs."""
    hf_config = read_hf_config(head_dir)
    stored = {n.removeprefix("model.") for f in sorted(Path(head_dir).glob("*.safetensors")) for n in checkpoint_keys(f)}
    if not stored:
        raise FileNotFoundError(f"{head_dir}: no *.safetensors weights")
    if any(n.startswith(EAGLE3_MARKERS) for n in stored):
        raise ValueError(f"speculative_config model {head_dir} is an EAGLE-3 head (method eagle3, not supported "
                         "yet); method eagle takes EAGLE-1 heads (fc.weight + layers.N)")
    if "fc.weight" not in stored:
        raise ValueError(f"speculative_config model {head_dir} is not an EAGLE head: it has no fc.weight "
                         "(an ordinary small model is method draft_model)")
    hidden, vocab = int(hf_config.get("hidden_size", 0)), int(hf_config.get("vocab_size", 0))
    if (hidden, vocab) != (target.args.hidden_size, target.args.vocab_size):
        raise ValueError(f"speculative_config model {head_dir} has hidden size {hidden} and vocabulary {vocab}; "
                         f"the target {target.args.hidden_size} and {target.args.vocab_size}: an EAGLE head must "
                         "be trained for its target")
    with torch.device(device):
        head = EagleLlamaHead(hf_config, dtype, backend, target, stored)
    load_weights(head, head_dir)  # type: ignore[arg-type]
    return head.eval()
