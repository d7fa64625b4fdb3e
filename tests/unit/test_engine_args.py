"""EngineArgs is the one declaration of every engine parameter: the CLI parsers and LLM() agree with it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from tandem import LLM
from tandem.bench.spec import DEFAULT_SPEC
from tandem.cli import build_parser, check_worker_args, main
from tandem.config import EngineConfig
from tandem.engine.arg_utils import EngineArgs
from tandem.router.launch import worker_block_size

FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}

# Each command's own flags (dests). An engine flag declared outside EngineArgs shows up here as an
# unexpected dest and fails test_cli_flags_are_engine_args: declare it in EngineArgs instead.
OWN_FLAGS = {
    ("generate",): {"prompt", "max_tokens", "temperature", "top_p", "top_k", "sampling_seed", "stop", "ignore_eos",
                    "echo"},
    ("serve",): {"host", "port", "served_model_name", "api_key", "max_queued_requests", "kv_events_endpoint",
                 "kv_events_replay_endpoint", "head_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "role",
                 "kv_transfer_host", "kv_transfer_port", "kv_lease_s", "kv_lease_max_s", "kv_transfer_timeout_s",
                 "kv_failure_policy", "kv_transport", "enable_tokenizer_info_endpoint", "enable_auto_tool_choice",
                 "tool_call_parser"},
    ("bench", "throughput"): {"dataset_name", "input_len", "output_len", "random_range_ratio", "num_prompts",
                              "num_warmups", "output_json", "disable_tqdm"},
    ("bench", "latency"): {"input_len", "output_len", "batch_size", "n", "num_iters_warmup", "num_iters",
                           "output_json", "disable_tqdm", "profile"},
    ("bench", "offload"): {"num_prompts", "input_len", "output_len", "rounds", "output_json"},
    ("bench", "spec"): {"text", "num_prompts", "batch_size", "input_len", "output_len", "rounds", "warmup",
                        "output_json"},
    ("eval", "perplexity"): {"files", "window", "output_json"},
    ("eval", "quality"): {"reference", "text", "window", "max_windows", "prompt_len", "continuation_len", "max_ppl_ratio",
                          "max_kl", "show_policy", "output_json"},
}
# Where a command means to differ from the engine default, and why.
DEFAULT_OVERRIDES = {
    # every iteration sends the same prompts: with prefix caching on, only the first would prefill
    (("bench", "latency"), "enable_prefix_caching"): False,
    # the engine with the host tier (the other one runs without)
    (("bench", "offload"), "kv_offloading_size"): 1.0,
    # the speculative engines' config (the baseline engine runs without)
    (("bench", "spec"), "speculative_config"): DEFAULT_SPEC,
}
MODEL_FORM = {("generate",): "positional", ("serve",): "positional", ("bench", "throughput"): "option",
              ("bench", "latency"): "option", ("bench", "offload"): "option", ("bench", "spec"): "option",
              ("eval", "perplexity"): "positional",
              ("eval", "quality"): "positional"}


def _subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize("path", list(OWN_FLAGS), ids=" ".join)
def test_cli_flags_are_engine_args(path):
    actions = _actions(_subparser(path))
    missing = set(FIELDS) - set(actions)
    assert not missing, f"tandem {' '.join(path)} lacks engine flags {sorted(missing)}"
    extra = set(actions) - set(FIELDS) - OWN_FLAGS[path]
    assert not extra, f"tandem {' '.join(path)} declares {sorted(extra)} outside EngineArgs (or add to OWN_FLAGS)"
    for name, f in FIELDS.items():
        action = actions[name]
        expected = DEFAULT_OVERRIDES.get((path, name), f.default)
        assert action.default == expected, f"tandem {' '.join(path)} --{name}: default {action.default!r}, " \
                                           f"EngineArgs has {f.default!r}"
        if name == "model" and MODEL_FORM[path] == "positional":
            assert not action.option_strings
            continue
        assert "--" + name.replace("_", "-") in action.option_strings, (path, name, action.option_strings)
        choices = f.metadata.get("choices") or f.metadata.get("cli_choices")
        assert tuple(action.choices or ()) == tuple(choices or ()), (path, name)


@pytest.mark.parametrize("path", list(OWN_FLAGS), ids=" ".join)
def test_cli_defaults_read_back_as_engine_args(path):
    argv = ["m", "files.txt"] if path == ("eval", "perplexity") else []
    args = _subparser(path).parse_args(argv)
    engine_args = EngineArgs.from_cli_args(args)
    overrides = {name: v for (p, name), v in DEFAULT_OVERRIDES.items() if p == path}
    model = "m" if path == ("eval", "perplexity") else None
    assert engine_args == EngineArgs(**{"model": model, **overrides})


def test_cli_round_trip_of_every_flag():
    """Each flag, set to a value other than its default, reads back as that value."""
    argv = ["serve", "some/model", "--tokenizer", "tok", "--dtype", "bfloat16", "--max-model-len", "512",
            "--seed", "7", "--device", "cpu", "--load-format", "dummy", "--attention-backend", "triton",
            "--enforce-eager", "--cuda-graph-sizes", "1", "2", "4", "--block-size", "32",
            "--no-enable-prefix-caching", "--kv-cache-memory", "64MiB", "--gpu-memory-utilization", "0.5",
            "--num-gpu-blocks-override", "100", "--max-num-batched-tokens", "512", "--max-num-seqs", "8",
            "--no-enable-chunked-prefill", "--scheduling-policy", "priority", "--async-scheduling",
            "--cpu-gemm", "onednn", "--quantization", "int8", "--precision-policy", "p.yaml",
            "--kv-cache-dtype", "fp8_e5m2", "--calculate-kv-scales", "--kv-cache-dtype-skip-layers", "0,3",
            "--kv-offloading-size", "1.5", "--kv-offloading-backend", "native", "--kv-disk-path", "d",
            "--kv-disk-size", "2", "--cpu-offload-gb", "4",
            "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    engine_args = EngineArgs.from_cli_args(build_parser().parse_args(argv))
    changed = {name for name, f in FIELDS.items() if getattr(engine_args, name) != f.default}
    assert changed == set(FIELDS), f"flags not exercised here: {sorted(set(FIELDS) - changed)}"
    assert engine_args.cuda_graph_sizes == [1, 2, 4] and engine_args.kv_cache_memory == "64MiB"
    assert engine_args.kv_cache_dtype_skip_layers == [0, 3]
    assert engine_args.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}


def test_every_field_reaches_the_engine_config():
    base = EngineArgs(model="m").create_engine_config()
    other = {"model": "other", "tokenizer": "tok", "dtype": "bfloat16", "max_model_len": 64, "seed": 1,
             "device": "cpu", "load_format": "dummy", "attention_backend": "torch", "enforce_eager": True,
             "cuda_graph_sizes": [1], "block_size": 32, "enable_prefix_caching": False, "kv_cache_memory": "1MiB",
             "gpu_memory_utilization": 0.5, "num_gpu_blocks_override": 3, "max_num_batched_tokens": 64,
             "max_num_seqs": 2, "enable_chunked_prefill": False, "scheduling_policy": "priority",
             "async_scheduling": True, "cpu_gemm": "blas", "quantization": "fp8", "precision_policy": "p.yaml",
             "kv_cache_dtype": "fp8", "calculate_kv_scales": True, "kv_cache_dtype_skip_layers": [0],
             "kv_offloading_size": 1.0, "kv_offloading_backend": "native", "kv_disk_path": "d", "kv_disk_size": 2.0,
             "cpu_offload_gb": 4.0, "speculative_config": {"method": "ngram"}}
    # fields that mean something only beside another: compared with a config that has that one alone
    needs = {"kv_offloading_backend": {"kv_offloading_size": 1.0}, "kv_disk_path": {"kv_offloading_size": 1.0},
             "kv_disk_size": {"kv_offloading_size": 1.0, "kv_disk_path": "d"}}
    assert set(other) == set(FIELDS)
    for name, value in other.items():
        context = needs.get(name, {})
        before = dataclasses.replace(EngineArgs(model="m"), **context).create_engine_config() if context else base
        config = dataclasses.replace(EngineArgs(model="m"), **{**context, name: value}).create_engine_config()
        assert isinstance(config, EngineConfig)
        if name == "kv_offloading_backend":  # its one choice is also what None means
            assert config.kv_offload is not None and config.kv_offload.backend == value
            continue
        assert config != before, f"EngineArgs.{name} does not reach the engine config"
    assert EngineArgs(model="m", attention_backend="triton").create_engine_config().model.attention_backend == "triton"


def test_llm_signature_is_engine_args():
    params = dict(inspect.signature(LLM).parameters)
    assert list(params) == list(FIELDS)
    for name, f in FIELDS.items():
        assert params[name].default == f.default, name


def test_llm_kwargs_go_through_engine_args(monkeypatch):
    import tandem.entrypoints.llm as llm_mod

    seen: list[EngineConfig] = []
    monkeypatch.setattr(llm_mod, "LLMEngine", lambda config: seen.append(config))
    llm = LLM("some/model", max_num_seqs=7, attention_backend="torch", scheduling_policy="priority")
    assert llm.engine_args == EngineArgs("some/model", max_num_seqs=7, attention_backend="torch",
                                         scheduling_policy="priority")
    (config,) = seen
    assert config.scheduler.max_num_seqs == 7 and config.scheduler.policy == "priority"
    assert config.model.attention_backend == "torch" and config.model.model == "some/model"


def test_unknown_llm_kwarg_is_an_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'unknown_kwarg'"):
        LLM(model="unused", unknown_kwarg=1)
    with pytest.raises(TypeError, match="'max_num_seq'.*did you mean 'max_num_seqs'"):
        LLM(model="unused", max_num_seq=1)


@pytest.mark.parametrize("name, value, error", [
    ("max_num_seqs", 0, ValueError),
    ("max_num_seqs", "8", TypeError),
    ("block_size", 0, ValueError),
    ("block_size", 12, ValueError),
    ("block_size", 16.0, TypeError),
    ("block_size", True, TypeError),
    ("max_num_batched_tokens", 0, ValueError),
    ("max_model_len", -1, ValueError),
    ("gpu_memory_utilization", 1.5, ValueError),
    ("gpu_memory_utilization", 0.0, ValueError),
    ("kv_cache_memory", "lots", ValueError),
    ("scheduling_policy", "lifo", ValueError),
    ("load_format", "pickle", ValueError),
    ("cuda_graph_sizes", [0, 1], ValueError),
    ("cuda_graph_sizes", 4, TypeError),
    ("enforce_eager", "yes", TypeError),
    ("num_gpu_blocks_override", -1, ValueError),
    ("kv_cache_dtype", "int4", ValueError),
    ("kv_cache_dtype_skip_layers", [-1], ValueError),
    ("kv_cache_dtype_skip_layers", 0, TypeError),
])
def test_validation_names_the_parameter(name, value, error):
    with pytest.raises(error, match=name):
        EngineArgs(model="m", **{name: value})
    with pytest.raises(error, match=name):
        LLM(model="m", **{name: value})


def test_cli_validation_error_names_the_parameter(capsys):
    from tandem.cli import main

    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
    assert main(["generate", "--block-size", "12", "--prompt", "x"]) == 2
    assert "block_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices, before anything starts
        main(["serve", "--kv-cache-dtype", "int4"])
    assert "--kv-cache-dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--kv-cache-dtype-skip-layers", "0,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_up_passes_engine_flags_verbatim_and_shares_the_block_size():
    actions = _actions(_subparser(("up",)))
    # tandem up's own --seed seeds the router's picker; engine flags reach the workers through --worker-args
    assert set(actions) & set(FIELDS) == {"model", "block_size", "seed"}
    assert actions["seed"].default is None and actions["block_size"].default is None
    extra = ["--max-num-seqs", "8", "--kv-cache-memory", "64MiB"]
    assert worker_block_size(None, extra) == (EngineArgs.block_size, extra)
    assert worker_block_size(None, [*extra, "--block-size", "32"]) == (32, [*extra, "--block-size", "32"])
    assert worker_block_size(32, extra) == (32, [*extra, "--block-size", "32"])
    assert worker_block_size(32, ["--block-size", "32"]) == (32, ["--block-size", "32"])
    with pytest.raises(ValueError, match="--block-size"):
        worker_block_size(32, ["--block-size", "16"])
    assert _actions(_subparser(("router",)))["block_size"].default == EngineArgs.block_size


def test_up_checks_worker_args_before_starting_workers(capsys):
    assert check_worker_args("m", "--max-num-seqs 8 --quantization int8").max_num_seqs == 8
    with pytest.raises(SystemExit):
        main(["up", "--worker-args", "--no-such-flag 1"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["up", "--worker-args", "--max-num-seqs 0"]) == 2
    assert "max_num_seqs must be >= 1" in capsys.readouterr().err
