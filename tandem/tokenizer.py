"""Tokenizer and generation defaults from a local Hugging Face directory (never the hub)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def eos_token_ids(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, hf_config: dict) -> set[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (any may list several)."""
    ids: set[int] = set()
    gen_path = Path(model_dir) / "generation_config.json"
    sources = [hf_config.get("eos_token_id")]
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(x) for x in src)
    return ids
