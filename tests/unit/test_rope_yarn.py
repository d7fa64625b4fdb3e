"""YaRN rope tables against transformers' own computation, plain (Qwen-style) and with DeepSeek's
mscale / mscale_all_dim; whole-model parity runs on the qwen3-yarn preset (test_model_parity)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tandem.model.layers import rope_inv_freq


@pytest.mark.parametrize("extra", [{}, {"mscale": 1.0, "mscale_all_dim": 0.707}, {"attention_factor": 1.3},
                                   {"beta_fast": 16, "beta_slow": 2, "truncate": False}])
def test_yarn_matches_transformers(extra):
    scaling = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, **extra}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=2048,
                      rope_parameters={"rope_theta": 50000.0, **scaling})
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
    freq, scale = rope_inv_freq(64, 50000.0, scaling)
    torch.testing.assert_close(freq, want_freq.float(), rtol=0, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
