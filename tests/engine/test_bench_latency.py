"""`tandem bench latency`: flags, step classification and the results JSON (no timing asserts)."""

from __future__ import annotations

import argparse
import json

import pytest

from tandem.bench.latency import (
    BatchTiming,
    add_latency_args,
    decode_flops_per_step,
    prefill_flops,
    run_latency,
    summarize,
)


def _args(model_dir, tmp_path, *extra: str) -> argparse.Namespace:
    return add_latency_args(argparse.ArgumentParser()).parse_args(
        ["--model", str(model_dir), "--batch-size", "2", "--input-len", "8", "--output-len", "4",
         "--num-iters-warmup", "1", "--num-iters", "2", "--kv-cache-memory", "8MiB",
         "--output-json", str(tmp_path / "out" / "latency.json"), "--disable-tqdm", *extra])


def test_prefill_flops_count_weights_per_token_and_causal_attention():
    shape = {"hidden_size": 4, "vocab_size": 10, "tie_word_embeddings": False, "num_params": 100, "num_layers": 2,
             "num_heads": 3, "head_dim": 2}
    # linear: 100 - 2 * 40 embedding params, 2 FLOPs each per token (3 x 5), LM head on 3 rows;
    # attention: QK and PV (2 x 2 FLOPs) x 2 layers x 3 heads x dim 2 x 15 causal pairs x 3 sequences
    assert prefill_flops(shape, 3, 5) == 2 * 20 * 15 + 2 * 40 * 3 + 4 * 2 * 3 * 2 * 15 * 3
    # a decode step: every weight but the input embedding once per sequence (3), attention over
    # the mean context 5 + 4 // 2 = 7 positions
    assert decode_flops_per_step(shape, 3, 5, 4) == 2 * 60 * 3 + 4 * 2 * 3 * 2 * 7 * 3


def test_decode_roofline_is_the_larger_bound():
    timing = BatchTiming(latency_s=1.0, prefill_s=0.1, prefill_steps_s=[0.1], decode_steps_s=[0.010, 0.010])
    memory = summarize([timing], 100, step_bytes=int(4e8), copy_bandwidth=1e11, flops=1e9, matmul_flops=1e11,
                       step_flops=2e8)  # 4 ms of bytes, 2 ms of FLOPs
    assert memory["decode_bound"] == "memory" and memory["decode_roofline_fraction"] == pytest.approx(0.4)
    compute = summarize([timing], 100, step_bytes=int(1e8), copy_bandwidth=1e11, flops=1e9, matmul_flops=1e11,
                        step_flops=6e8)
    assert compute["decode_bound"] == "compute" and compute["decode_roofline_bound_ms"] == pytest.approx(6.0)
    # phases one after another: linear layers compute-bound (5 ms > 0.5 ms of weight bytes), then
    # attention memory-bound (0.5 ms of KV bytes > 0.1 ms of FLOPs); the whole step's bound hides the latter
    phased = summarize([timing], 100, step_bytes=int(1e8), copy_bandwidth=1e11, flops=1e9, matmul_flops=1e11,
                       step_flops=6e8, step_phases=[(5e7, 5e8), (5e7, 1e7)])
    assert phased["decode_phase_bound_ms"] == pytest.approx(5.5)
    assert phased["decode_phase_fraction"] == pytest.approx(0.55)
    assert memory["decode_phase_bound_ms"] is None


def test_defaults_match_vllm_and_prefix_caching_is_off():
    args = add_latency_args(argparse.ArgumentParser()).parse_args([])
    assert (args.input_len, args.output_len, args.batch_size, args.n) == (32, 128, 8, 1)
    assert (args.num_iters_warmup, args.num_iters, args.seed) == (10, 30, 0)
    assert args.model is None and args.output_json is None and args.enable_prefix_caching is False


def test_run_latency_writes_results_json(model_dirs, tmp_path, capsys):
    res = run_latency(_args(model_dirs["llama3-gqa"], tmp_path))
    out = tmp_path / "out" / "latency.json"
    assert res["output_json"] == str(out) and out.is_file()
    saved = json.loads(out.read_text())
    for key in ("avg_latency", "latencies", "percentiles", "median_decode_step_ms", "median_prefill_s",
                "model_weight_bytes", "achieved_weight_bandwidth_gbps", "device", "model_shape", "workload",
                "flags", "date"):
        assert key in saved, key
    assert len(saved["latencies"]) == 2 and all(t > 0 for t in saved["latencies"])
    pct = [saved["percentiles"][k] for k in ("10", "25", "50", "75", "90", "99")]
    assert pct == sorted(pct) and min(saved["latencies"]) <= pct[0] <= pct[-1] <= max(saved["latencies"])
    # 2 prompts of 8 tokens fit in one step (prefill + first token), then 3 decode steps each
    assert saved["num_prefill_steps"] == 2 and saved["num_decode_steps"] == 6
    assert 0 < saved["median_prefill_s"] < saved["avg_latency"]
    assert saved["median_decode_step_ms"] > 0 and saved["achieved_weight_bandwidth_gbps"] > 0
    assert saved["prefill_flops"] == prefill_flops(saved["model_shape"], 2, 8)
    assert saved["matmul_gflops"] > 0 and saved["prefill_flops_fraction"] > 0
    assert saved["decode_flops_per_step"] == decode_flops_per_step(saved["model_shape"], 2, 8, 4)
    assert saved["decode_bound"] in ("memory", "compute") and saved["decode_roofline_fraction"] > 0
    assert saved["decode_phase_bound_ms"] >= saved["decode_roofline_bound_ms"] > 0
    assert 0 < saved["median_prefill_compute_s"] <= saved["median_prefill_s"]
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[saved["dtype"]]
    assert saved["model_weight_bytes"] == saved["model_shape"]["num_params"] * itemsize
    assert saved["workload"] == {**saved["workload"], "batch_size": 2, "input_len": 8, "output_len": 4,
                                 "n": 1, "iters": 2}
    assert saved["flags"]["enable_prefix_caching"] is False
    assert "Avg latency" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--output-len", "0"), ("--num-iters", "0")])
def test_bad_workload_flag_raises_before_building_engine(model_dirs, tmp_path, flag, value):
    with pytest.raises(ValueError, match=flag):
        run_latency(_args(model_dirs["llama3-gqa"], tmp_path, flag, value))
    assert not (tmp_path / "out").exists()


def test_dummy_load_format_benchmarks_a_shape_without_weights(tmp_path, monkeypatch):
    """--load-format dummy with a built-in shape name: the benchmark writes config.json itself."""
    monkeypatch.chdir(tmp_path)
    args = add_latency_args(argparse.ArgumentParser()).parse_args(
        ["--model", "bench-88m", "--load-format", "dummy", "--batch-size", "1", "--input-len", "8",
         "--output-len", "3", "--num-iters-warmup", "0", "--num-iters", "1", "--kv-cache-memory", "16MiB",
         "--output-json", "lat.json", "--disable-tqdm"])
    res = run_latency(args)
    assert (tmp_path / ".cache" / "dummy" / "bench-88m" / "config.json").is_file()
    assert not list((tmp_path / ".cache" / "dummy" / "bench-88m").glob("*.safetensors"))
    assert res["load_format"] == "dummy" and res["model_shape"]["num_params"] > 80e6
    assert (res["input_len"], res["output_len"], res["batch_size"]) == (8, 3, 1)
    assert res["copy_bandwidth_gbps"] > 0 and res["decode_bandwidth_fraction"] > 0
    assert res["decode_bytes_per_step"] > res["model_weight_bytes"]  # weights plus the KV read


def test_dummy_weights_are_seeded_and_finite(model_dirs):
    import torch

    from tandem import LLM, SamplingParams

    outs = []
    for _ in range(2):
        llm = LLM(model=str(model_dirs["llama3-gqa"]), load_format="dummy", kv_cache_memory="8MiB")
        params = next(llm.llm_engine.runner.model.parameters())
        assert torch.isfinite(params).all()
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4))
        outs.append(out[0].outputs[0].token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 4
    loaded = LLM(model=str(model_dirs["llama3-gqa"]), kv_cache_memory="8MiB")
    assert not torch.equal(next(loaded.llm_engine.runner.model.parameters()), params)  # not the checkpoint


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_profile_splits_prefill_and_decode_steps_by_phase_and_op(model_dirs, tmp_path, capsys, backend):
    res = run_latency(_args(model_dirs["llama3-gqa"], tmp_path, "--profile", "--attention-backend", backend))
    profile = json.loads((tmp_path / "out" / "latency.json").read_text())["profile"]
    assert set(profile) == {"prefill", "decode"} and profile == res["profile"]
    assert profile["prefill"]["steps"] == 1 and profile["decode"]["steps"] == 3
    for kind in ("prefill", "decode"):
        share, ms = profile[kind]["share"], profile[kind]["ms_per_step"]
        assert sum(share.values()) == pytest.approx(1.0, abs=0.01) and set(share) == set(ms)
        # the model's parts and the engine's phases are all told apart
        # the cpu backend writes K/V inside its fused rotary kernel
        kv_write = "kv_write" if backend == "torch" else "rope_and_kv_write"
        assert {"matmul", "attention", kv_write, "norm_and_residual", "activation", "lm_head", "sample",
                "schedule", "update", "outputs"} <= set(share), sorted(share)
        assert all(v > 0 for v in ms.values())
    # torch's decode gathers the cache it did not write this step; the CPU kernel reads it in place
    assert ("kv_gather" in profile["decode"]["share"]) == (backend == "torch")
    assert "Profile, decode steps (3)" in capsys.readouterr().out
