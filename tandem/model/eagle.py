"""EAGLE heads (speculative decoding, ``speculative_config`` methods ``eagle`` and ``eagle3``).

EAGLE-1 (method eagle), in the checkpoint layout vLLM loads as ``EagleLlamaForCausalLM``:
``fc.weight`` [hidden, 2 x hidden] (``fc.bias`` optional), then ``layers.N.*`` Llama decoder layers
(the first without its input norm; a stored ``layers.0.input_layernorm.weight`` is unused, as in
vLLM), and no final norm. ``embed_tokens.weight`` and ``lm_head.weight`` are optional: a head
without them uses the target's.

At position t the head reads the embedding of token t + 1 and the target's final hidden state f_t
(after its final norm) and predicts f_{t+1}; the LM head turns a prediction into a draft token, and
the prediction is the next position's feature when drafting goes on.

EAGLE-3 (method eagle3), in the layout vLLM loads as ``LlamaForCausalLMEagle3``: the target's
feature is the concatenation of its residual stream entering three layers
(``eagle_config.eagle_aux_hidden_state_layer_ids``, vLLM's default (2, L // 2, L - 3)), which ``fc``
maps to the hidden size; one decoder layer ``midlayer`` whose attention reads [input_layernorm(token
embedding), hidden_norm(feature)] (q/k/v from twice the hidden size); a final ``norm`` and its own
``lm_head`` over a draft vocabulary of ``draft_vocab_size`` tokens, mapped to the target's by
``d2t`` (target id = draft id + d2t[draft id]). Its prediction before the final norm is the next
position's feature when drafting goes on (where ``fc`` no longer applies).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tandem.model.attention import AttentionBackend, AttentionMetadata
from tandem.model.interface import CausalLM
from tandem.model.layers import Linear, RMSNorm, VocabEmbedding
from tandem.model.llama import MLP, Attention, DecoderLayer, LlamaArgs, LlamaForCausalLM
from tandem.model.loader import checkpoint_keys, load_weights, read_hf_config

EAGLE3_MARKERS = ("midlayer.", "d2t", "t2d")  # tensors only an EAGLE-3 head has


class _EagleHead(nn.Module):
    """What both heads share: Llama widths from their config, the target's embeddings unless the
    checkpoint has its own, and checkpoint names as vLLM writes them (``model.`` optional)."""

    unused: frozenset[str] = frozenset()  # checkpoint tensors the head does not load as parameters

    def __init__(self, hf_config: dict, dtype: torch.dtype, target: CausalLM, stored: set[str]) -> None:
        super().__init__()
        self.args = a = LlamaArgs.from_hf(hf_config, "llama")
        self.embed_tokens = (VocabEmbedding(a.vocab_size, a.hidden_size, dtype)
                             if "embed_tokens.weight" in stored else None)
        self._target = (target,)  # a tuple: the target's embeddings and LM head are not the head's parameters

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else self._target[0].model.embed_tokens  # type: ignore[attr-defined]
        return embed(input_ids)

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        name = name.removeprefix("model.")
        if name in self.unused or "rotary_emb.inv_freq" in name:
            return None
        return LlamaForCausalLM.fused_name(name)


class EagleLlamaHead(_EagleHead):
    unused = frozenset({"layers.0.input_layernorm.weight"})  # vLLM's first layer has no input norm either

    def __init__(self, hf_config: dict, dtype: torch.dtype, backend: AttentionBackend, target: CausalLM,
                 stored: set[str]) -> None:
        """stored: the checkpoint's tensor names (which optional parts the head has)."""
        super().__init__(hf_config, dtype, target, stored)
        a = self.args
        self.fc = Linear(2 * a.hidden_size, a.hidden_size, bias="fc.bias" in stored, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(a, dtype, backend, i, input_norm=i > 0) for i in range(a.num_layers))
        self.lm_head = VocabEmbedding(a.vocab_size, a.hidden_size, dtype) if "lm_head.weight" in stored else None

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids[i]: the token after position positions[i]; features[i]: the target's (or the
        head's own previous) feature at that position. Returns the predicted next features."""
        h = self.fc(torch.cat([self._embed(input_ids), features], dim=-1))
        for layer in self.layers:
            h = layer(positions, h, meta)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.logits(hidden).float()
        return self._target[0].compute_logits(hidden)

    def draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The argmax token (target ids) of each predicted feature."""
        return self.compute_logits(hidden)[:, : self.args.vocab_size].argmax(-1)

    def attention_layers(self) -> list[Attention]:
        layers = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)  # the head holds nothing else
            assert isinstance(layer.self_attn, Attention)  # a head's config has no latent attention
            layers.append(layer.self_attn)
        return layers


class Eagle3DecoderLayer(nn.Module):
    """EAGLE-3's one layer: attention over [input_layernorm(embedding), hidden_norm(feature)]; the
    feature is the residual."""

    def __init__(self, a: LlamaArgs, dtype: torch.dtype, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = Attention(a, dtype, backend, input_size=2 * a.hidden_size)
        self.mlp = MLP(a.hidden_size, a.intermediate_size, dtype, backend.ops)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.hidden_norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.ops = backend.ops

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, h: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        norm_e, norm_h, norm2 = self.input_layernorm, self.hidden_norm, self.post_attention_layernorm
        x = torch.cat([self.ops.rms_norm(embeds, norm_e.weight, norm_e.eps),
                       self.ops.rms_norm(h, norm_h.weight, norm_h.eps)], dim=-1)
        attn = self.self_attn(positions, x, meta)
        x, h = self.ops.add_rms_norm(attn, h, norm2.weight, norm2.eps)  # h += attn; x = norm2(h)
        return h + self.mlp(x)


class Eagle3LlamaHead(_EagleHead):
    d2t: torch.Tensor  # a buffer: draft id -> target id - draft id
    unused = frozenset({"d2t", "t2d"})  # d2t is read by load_eagle_head; t2d (its inverse) is not needed

    def __init__(self, hf_config: dict, dtype: torch.dtype, backend: AttentionBackend, target: CausalLM,
                 stored: set[str]) -> None:
        super().__init__(hf_config, dtype, target, stored)
        a = self.args
        target_hidden = int(hf_config.get("target_hidden_size") or target.args.hidden_size)
        self.aux_layers = aux_hidden_layers(hf_config, target)
        self.fc = Linear(len(self.aux_layers) * target_hidden, a.hidden_size, bias="fc.bias" in stored, dtype=dtype)
        self.midlayer = Eagle3DecoderLayer(a, dtype, backend)
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.draft_vocab_size = int(hf_config.get("draft_vocab_size") or a.vocab_size)
        self.lm_head = VocabEmbedding(self.draft_vocab_size, a.hidden_size, dtype)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64), persistent=False)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """features: the target's (its aux hidden states side by side) or the head's own previous
        prediction. Returns the predicted next features, before the final norm."""
        if features.shape[-1] != self.args.hidden_size:
            features = self.fc(features)
        return self.midlayer(positions, self._embed(input_ids), features, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary."""
        return self.lm_head.logits(self.midlayer.ops.rms_norm(hidden, self.norm.weight, self.norm.eps)).float()

    def draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        best = self.compute_logits(hidden)[:, : self.draft_vocab_size].argmax(-1)
        return best + self.d2t[best]

    def attention_layers(self) -> list[Attention]:
        return [self.midlayer.self_attn]


def aux_hidden_layers(hf_config: dict, target: CausalLM) -> tuple[int, ...]:
    """The target layers whose incoming residual stream EAGLE-3 reads (vLLM's default (2, L // 2, L - 3))."""
    num_layers = target.args.num_layers
    layers = (hf_config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") \
        or [2, num_layers // 2, num_layers - 3]
    if not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise ValueError(f"EAGLE-3 head: aux hidden state layers {list(layers)} are not layers of the "
                         f"{num_layers}-layer target (set eagle_config.eagle_aux_hidden_state_layer_ids)")
    return tuple(layers)


def load_eagle_head(head_dir: str | Path, target: CausalLM, dtype: torch.dtype, device: torch.device,
                    backend: AttentionBackend, method: str = "eagle") -> EagleLlamaHead | Eagle3LlamaHead:
    """The head in ``head_dir`` over ``target`` (method eagle or eagle3); a head that does not fit
    the method or the target is an error naming what differs."""
    hf_config = read_hf_config(head_dir)
    files = sorted(Path(head_dir).glob("*.safetensors"))
    stored = {n.removeprefix("model.") for f in files for n in checkpoint_keys(f)}
    if not stored:
        raise FileNotFoundError(f"{head_dir}: no *.safetensors weights")
    is_eagle3 = any(n.startswith(EAGLE3_MARKERS) for n in stored)
    if is_eagle3 != (method == "eagle3"):
        raise ValueError(f"speculative_config model {head_dir} is an {'EAGLE-3' if is_eagle3 else 'EAGLE-1'} head: "
                         f"use method {'eagle3' if is_eagle3 else 'eagle'}")
    if "fc.weight" not in stored:
        raise ValueError(f"speculative_config model {head_dir} is not an EAGLE head: it has no fc.weight "
                         "(an ordinary small model is method draft_model)")
    hidden, vocab = int(hf_config.get("hidden_size", 0)), int(hf_config.get("vocab_size", 0))
    if (hidden, vocab) != (target.args.hidden_size, target.args.vocab_size):
        raise ValueError(f"speculative_config model {head_dir} has hidden size {hidden} and vocabulary {vocab}; "
                         f"the target {target.args.hidden_size} and {target.args.vocab_size}: an EAGLE head must "
                         "be trained for its target")
    cls = Eagle3LlamaHead if is_eagle3 else EagleLlamaHead
    with torch.device(device):
        head = cls(hf_config, dtype, backend, target, stored)
    load_weights(head, head_dir)  # type: ignore[arg-type]
    if isinstance(head, Eagle3LlamaHead) and "d2t" in stored:
        _load_draft_vocab(head, files, vocab)
    return head.eval()


def _load_draft_vocab(head: Eagle3LlamaHead, files: list[Path], vocab: int) -> None:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if "d2t" in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                d2t = f.get_tensor("d2t").to(torch.int64)
    if d2t.shape != head.d2t.shape:
        raise ValueError(f"EAGLE-3 head: d2t has shape {tuple(d2t.shape)}, draft_vocab_size {head.draft_vocab_size}")
    targets = torch.arange(len(d2t)) + d2t
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(f"EAGLE-3 head: d2t maps draft tokens outside the target's vocabulary of {vocab}")
    head.d2t.copy_(d2t)
