"""`tandem bench spec` end to end on the demo model, tiny: the results file records the device, the
model and the variants, every engine gives the same tokens, and speculation verified drafts."""

from __future__ import annotations

import json

import pytest

from tandem.bench.spec import run_spec
from tandem.cli import build_parser


def test_bench_spec_batch_sizes_are_checked():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "spec", "--batch-size", "1,8"])


def test_bench_spec_writes_a_results_file(tmp_path):
    out = tmp_path / "spec.json"
    args = build_parser().parse_args(["bench", "spec", "--num-prompts", "1", "--batch-size", "3,2", "--input-len", "48",
                                      "--output-len", "12", "--rounds", "1", "--output-json", str(out)])
    assert args.func.__name__ == "_cmd_bench_spec"
    run_spec(args)
    results = json.loads(out.read_text())
    assert results["benchmark"] == "spec_decode" and results["device"].startswith("cpu")
    assert results["model_shape"]["num_params"] > 0 and results["flags"]["speculative_variants"]["off"] is None
    # a list of batch sizes sweeps the concurrency
    assert set(results["cases"]) == {f"{w}-batch{n}" for w in ("code", "copy") for n in (1, 2, 3)}
    assert results["workload"]["batch_size"] == [2, 3]
    for case in results["cases"].values():
        assert case["same_outputs"] and case["off"]["verified_steps_with_drafts"] == 0
    assert sum(c["fixed"]["verified_steps_with_drafts"] for c in results["cases"].values()) > 0
