"""KV cache bytes per token of the MLA models' shapes (tandem/testing.py DUMMY_CONFIGS): the latent
cache tandem keeps (one row of kv_lora_rank + qk_rope_head_dim per layer, from the engine's own
``KVCacheSpec``) against the same model with full per-head K and V (heads x (nope + rope) for K,
heads x v_head_dim for V), and how many tokens each fits in a given budget.

    python scripts/mla_kv_bytes.py --output-json benchmarks/results/mla-kv-bytes-<UTC time>.json
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import torch

from tandem.config import CacheConfig
from tandem.model.llama import LlamaArgs
from tandem.runner.kv_cache_spec import KVCacheSpec
from tandem.testing import DUMMY_CONFIGS

SHAPES = ("deepseek-v3", "deepseek-v3-small")


def row(name: str, dtype: torch.dtype, budget_gib: float) -> dict:
    cfg = DUMMY_CONFIGS[name]
    args = LlamaArgs.from_hf(cfg, cfg["model_type"])
    assert args.mla is not None
    spec = KVCacheSpec.build(CacheConfig(block_size=16), dtype, args.num_layers, args.num_kv_heads, args.head_dim,
                             args.values_share_keys)
    latent = spec.bytes_per_block // 16
    size = torch.empty(0, dtype=dtype).element_size()
    m = args.mla
    full = args.num_layers * args.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * size
    budget = budget_gib * 2**30
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "layers": args.num_layers,
            "heads": args.num_heads, "latent_row": m.cache_width, "kv_bytes_per_token_latent": latent,
            "kv_bytes_per_token_full_kv": full, "full_over_latent": full / latent,
            f"tokens_in_{budget_gib:g}_gib_latent": int(budget // latent),
            f"tokens_in_{budget_gib:g}_gib_full_kv": int(budget // full)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget-gib", type=float, default=64.0)
    p.add_argument("--output-json")
    a = p.parse_args()
    result = {"benchmark": "KV cache bytes per token, MLA latent vs full K/V (arithmetic from the engine's "
                           "KVCacheSpec; no device involved)",
              "device": "none (computed)", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "rows": [row(name, torch.bfloat16, a.budget_gib) for name in SHAPES]}
    text = json.dumps(result, indent=1)
    print(text)
    if a.output_json:
        with open(a.output_json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
