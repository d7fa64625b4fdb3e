"""Precision policies: which scheme each linear layer of a model gets, as data.

A policy file (YAML) is an ordered list of rules and an ignore list::

    rules:
      - match: attention          # a layer kind: attention, mlp, experts, lm_head
        scheme: fp8
      - match: "re:.*\\.down_proj" # a regular expression (fullmatch) ...
        scheme: int8
      - match: "model.layers.*"   # ... or a glob over module names
        scheme: int8
    ignore: ["model.layers.0.*"] # these stay in the model's dtype, whatever the rules say

The first matching rule wins; a layer no rule matches stays in the model's dtype. Names are our
module names (``model.layers.3.self_attn.qkv_proj``) or the checkpoint's for fused layers
(``...q_proj``): a fused layer matches a pattern that matches its own name or every one of its
parts, and a pattern matching only some parts is an error (they share one weight). The LM head is
only ever matched by ``lm_head`` itself, so a broad pattern never quantizes it by accident (the
embeddings are never quantized). A rule or ignore entry that matches no layer, an unknown scheme,
or a scheme a layer cannot take fails with the rule named.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tandem.quantization.schemes import QUANTIZATION_METHODS, SCHEMES, check_scheme

KINDS = ("attention", "mlp", "experts", "lm_head")
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class LayerRef:
    """A linear layer as a policy sees it."""
    name: str
    kind: str
    in_features: int
    parts: tuple[str, ...] = ()  # checkpoint names of a fused layer's parts (q/k/v_proj, gate/up_proj)


@dataclass(frozen=True)
class Rule:
    match: str
    scheme: str
    where: str  # "rule 2" / "ignore 1" / "--quantization": how errors name it

    def describe(self) -> str:
        return f"{self.where} (match {self.match!r})"


@dataclass(frozen=True)
class LayerPrecision:
    name: str
    kind: str
    scheme: str | None  # None: the model's dtype
    reason: str


@dataclass
class PrecisionPolicy:
    rules: list[Rule]
    ignore: list[Rule] = field(default_factory=list)
    source: str = ""

    @classmethod
    def from_quantization(cls, method: str) -> PrecisionPolicy:
        """vLLM's online ``quantization`` flag: every linear layer but the LM head."""
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")
        return cls([Rule("*", method, "--quantization")], source=f"quantization={method}")

    @classmethod
    def from_file(cls, path: str | Path) -> PrecisionPolicy:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"precision policy {path}: no such file")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"precision policy {path}: not valid YAML: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "policy") -> PrecisionPolicy:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a policy is a mapping with 'rules' and optionally 'ignore'")
        unknown = set(data) - {"rules", "ignore", "description"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} (a policy has rules, ignore, description)")
        rules = [_rule(entry, i, source) for i, entry in enumerate(_list(data, "rules", source), start=1)]
        ignore = [Rule(_pattern(p, f"ignore {i}", source), "", f"ignore {i}")
                  for i, p in enumerate(_list(data, "ignore", source), start=1)]
        if not rules:
            raise ValueError(f"{source}: no rules")
        return cls(rules, ignore, source)

    def resolve(self, layers: list[LayerRef]) -> list[LayerPrecision]:
        """The scheme of every layer, in the layers' order; errors name the rule at fault."""
        used: set[str] = set()
        resolved = [self._resolve_one(layer, used) for layer in layers]
        for rule in self.rules + self.ignore:
            if rule.where not in used:
                raise ValueError(f"{self.source}: {rule.describe()} matches no layer of this model")
        return resolved

    def _resolve_one(self, layer: LayerRef, used: set[str]) -> LayerPrecision:
        for entry in self.ignore:
            if _matches(entry, layer):
                used.add(entry.where)
                return LayerPrecision(layer.name, layer.kind, None, entry.describe())
        for rule in self.rules:
            if _matches(rule, layer):
                used.add(rule.where)
                reason = check_scheme(rule.scheme, layer.in_features)
                if reason:
                    raise ValueError(f"{self.source}: {rule.describe()} gives {layer.name} {rule.scheme}: {reason}")
                return LayerPrecision(layer.name, layer.kind, rule.scheme, rule.describe())
        return LayerPrecision(layer.name, layer.kind, None, "no rule")


def _list(data: dict, key: str, source: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{source}: '{key}' must be a list")
    return value


def _rule(entry: object, index: int, source: str) -> Rule:
    where = f"rule {index}"
    if not isinstance(entry, dict) or set(entry) != {"match", "scheme"}:
        raise ValueError(f"{source}: {where} must have exactly the keys 'match' and 'scheme', got {entry!r}")
    scheme = entry["scheme"]
    if scheme not in SCHEMES:
        raise ValueError(f"{source}: {where}: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return Rule(_pattern(entry["match"], where, source), scheme, where)


def _pattern(value: object, where: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: {where}: match must be a non-empty string, got {value!r}")
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as e:
            raise ValueError(f"{source}: {where}: bad regular expression {value[3:]!r}: {e}") from e
    return value


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _matches(rule: Rule, layer: LayerRef) -> bool:
    if layer.kind == LM_HEAD or rule.match == LM_HEAD:
        return layer.kind == LM_HEAD and rule.match == LM_HEAD
    if rule.match in KINDS:
        return layer.kind == rule.match
    if _name_matches(rule.match, layer.name):
        return True
    hits = [part for part in layer.parts if _name_matches(rule.match, part)]
    if hits and len(hits) < len(layer.parts):
        raise ValueError(f"{rule.describe()} matches {', '.join(hits)} but not all of {', '.join(layer.parts)}: "
                         f"they are one fused weight ({layer.name}) and take one scheme")
    return bool(hits)
