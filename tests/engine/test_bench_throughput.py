"""`tandem bench throughput`: vLLM's random dataset, the CLI, and the results JSON (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tandem.bench.throughput import length_bounds, sample_random_requests
from tandem.cli import main
from tandem.tokenizer import load_tokenizer


def test_length_bounds_match_vllm_formula():
    assert length_bounds(100, 20, 0.5) == ((50, 150), (10, 30))
    assert length_bounds(100, 20, {"input": 0.0, "output": 0.25}, num_special_tokens=1) == ((99, 99), (15, 25))
    assert length_bounds(10, 1, 0.8) == ((1, 18), (1, 2))
    with pytest.raises(ValueError, match="range_ratio"):
        length_bounds(100, 20, 1.0)


def test_random_dataset_is_deterministic_and_within_bounds(model_dirs):
    tok = load_tokenizer(str(model_dirs["llama3-gqa"]))
    a, _ = sample_random_requests(tok, 8, 40, 10, 0.5, seed=3, retokenize=False)
    b, _ = sample_random_requests(tok, 8, 40, 10, 0.5, seed=3, retokenize=False)
    c, _ = sample_random_requests(tok, 8, 40, 10, 0.5, seed=4, retokenize=False)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    (in_lo, in_hi), (out_lo, out_hi) = length_bounds(40, 10, 0.5, tok.num_special_tokens_to_add())
    special = set(tok.all_special_ids)
    for r in a:
        assert in_lo <= r.prompt_len <= in_hi and out_lo <= r.expected_output_len <= out_hi
        assert r.prompt_len == len(r.prompt_token_ids) and not special & set(r.prompt_token_ids)
    # retokenized prompts decode and re-encode to themselves (what a text client would send)
    fixed, mismatch = sample_random_requests(tok, 4, 40, 10, 0.5, seed=3)
    assert abs(mismatch) <= 4  # vLLM gives up after 10 decode/re-encode rounds too
    stable = [r for r in fixed if tok.encode(tok.decode(r.prompt_token_ids), add_special_tokens=False)
              == r.prompt_token_ids]
    assert len(stable) >= 3


def test_cli_writes_results_json(model_dirs, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["bench", "throughput", "--model", str(model_dirs["llama3-gqa"]), "--num-prompts", "6",
               "--input-len", "24", "--output-len", "5", "--random-range-ratio", "0.5",
               "--kv-cache-memory", "8MiB", "--output-json", str(out), "--disable-tqdm", "--num-warmups", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second",
                "tokens_per_second", "output_tokens_per_second", "device", "model_shape", "workload",
                "flags", "date", "total_token_throughput", "load_format", "attention_backend"):
        assert key in res, key
    assert (res["input_len"], res["output_len"], res["num_prompts"]) == (24, 5, 6)
    assert res["total_token_throughput"] == res["tokens_per_second"] and res["load_format"] == "auto"
    assert res["num_requests"] == 6 and res["device"].startswith("cpu")
    wl = res["workload"]
    # ignore_eos: every request produces exactly its sampled output length
    assert wl["total_output_tokens"] == wl["requested_output_tokens"]
    assert res["total_num_tokens"] == wl["total_prompt_tokens"] + wl["total_output_tokens"]
    assert res["model_shape"]["num_layers"] >= 1 and res["model_shape"]["num_params"] > 0
    assert "Throughput:" in capsys.readouterr().out


def test_cli_rejects_requests_longer_than_context(model_dirs, tmp_path, capsys):
    rc = main(["bench", "throughput", "--model", str(model_dirs["llama3-gqa"]), "--num-prompts", "2",
               "--input-len", "64", "--output-len", "8", "--max-model-len", "32",
               "--kv-cache-memory", "8MiB", "--output-json", str(tmp_path / "x.json"), "--disable-tqdm"])
    assert rc == 2 and "max_model_len" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
