"""Precision policies (tandem/quantization/policy.py): how rules resolve against a model's layers,
and that every mistake in a policy is an error naming the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.quantization import load_policy
from tandem.quantization.policy import LayerRef, PrecisionPolicy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def _layers(num_layers: int = 2, in_features: int = 64) -> list[LayerRef]:
    out = []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        out += [LayerRef(f"{p}.self_attn.qkv_proj", "attention", in_features,
                         (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj")),
                LayerRef(f"{p}.self_attn.o_proj", "attention", in_features),
                LayerRef(f"{p}.mlp.gate_up_proj", "mlp", in_features, (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")),
                LayerRef(f"{p}.mlp.down_proj", "mlp", in_features * 3)]
    return out + [LayerRef("lm_head", "lm_head", in_features)]


def _schemes(policy: dict, layers: list[LayerRef] | None = None) -> dict[str, str | None]:
    return {r.name: r.scheme for r in PrecisionPolicy.from_dict(policy).resolve(layers or _layers())}


def test_first_matching_rule_wins_and_unmatched_layers_keep_the_model_dtype():
    got = _schemes({"rules": [{"match": "*.down_proj", "scheme": "int8"}, {"match": "mlp", "scheme": "fp8"}]})
    assert got["model.layers.0.mlp.down_proj"] == "int8"
    assert got["model.layers.1.mlp.gate_up_proj"] == "fp8"
    assert got["model.layers.0.self_attn.qkv_proj"] is None
    assert got["lm_head"] is None


def test_ignore_wins_over_rules_and_regex_matches_whole_names():
    got = _schemes({"rules": [{"match": "re:model\\.layers\\.\\d+\\..*", "scheme": "int8"}],
                    "ignore": ["re:model\\.layers\\.0\\..*"]})
    assert {n: s for n, s in got.items() if n.startswith("model.layers.0.")} == dict.fromkeys(
        [n for n in got if n.startswith("model.layers.0.")])
    assert all(s == "int8" for n, s in got.items() if n.startswith("model.layers.1."))


def test_fused_layers_match_by_their_checkpoint_parts():
    got = _schemes({"rules": [{"match": "re:.*\\.(q|k|v)_proj", "scheme": "fp8"}]})
    assert got["model.layers.0.self_attn.qkv_proj"] == "fp8"
    with pytest.raises(ValueError, match=r"matches model.layers.0.self_attn.q_proj but not all .* one fused weight"):
        _schemes({"rules": [{"match": "*.q_proj", "scheme": "fp8"}]})


def test_the_lm_head_is_quantized_only_when_named():
    assert _schemes({"rules": [{"match": "*", "scheme": "int8"}]})["lm_head"] is None
    got = _schemes({"rules": [{"match": "lm_head", "scheme": "int8"}, {"match": "*", "scheme": "fp8"}]})
    assert got["lm_head"] == "int8" and got["model.layers.0.mlp.down_proj"] == "fp8"


def test_online_quantization_covers_every_linear_but_the_lm_head():
    got = {r.name: r.scheme for r in load_policy("int8", None).resolve(_layers())}  # type: ignore[union-attr]
    assert got.pop("lm_head") is None and set(got.values()) == {"int8"}
    assert load_policy(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        load_policy("int8", str(EXAMPLES / "attention-fp8-mlp-int8.yaml"))
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_policy("int4", None)


@pytest.mark.parametrize(("policy", "message"), [
    ({"rules": [{"match": "experts", "scheme": "fp8"}]}, "rule 1 \\(match 'experts'\\) matches no layer"),
    ({"rules": [{"match": "mlp", "scheme": "int8"}, {"match": "*.nothing", "scheme": "fp8"}]},
     "rule 2 \\(match '\\*.nothing'\\) matches no layer"),
    ({"rules": [{"match": "mlp", "scheme": "int8"}], "ignore": ["nope.*"]}, "ignore 1 .* matches no layer"),
    ({"rules": [{"match": "mlp", "scheme": "int3"}]}, "rule 1: unknown scheme 'int3'"),
    ({"rules": [{"match": "mlp", "schem": "int8"}]}, "rule 1 must have exactly the keys"),
    ({"rules": [{"match": "re:(", "scheme": "int8"}]}, "rule 1: bad regular expression"),
    ({"rules": []}, "no rules"),
    ({"rules": [{"match": "mlp", "scheme": "int8"}], "default": "fp8"}, "unknown key"),
    (["mlp"], "a policy is a mapping"),
])
def test_policy_mistakes_name_the_rule(policy, message):
    with pytest.raises(ValueError, match=message):
        _schemes(policy)


def test_a_scheme_a_layer_cannot_take_names_rule_and_layer():
    layers = _layers(in_features=48)  # not a multiple of mxfp4's 32-element blocks
    with pytest.raises(ValueError, match="rule 1 .* gives model.layers.0.self_attn.qkv_proj mxfp4: .*multiple of 32"):
        _schemes({"rules": [{"match": "attention", "scheme": "mxfp4"}]}, layers)


def test_policy_files_load_and_bad_files_are_clear(tmp_path):
    for path in EXAMPLES.glob("*.yaml"):
        assert PrecisionPolicy.from_file(path).rules, path
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [match: mlp\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        PrecisionPolicy.from_file(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        PrecisionPolicy.from_file(tmp_path / "missing.yaml")
