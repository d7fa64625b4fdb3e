"""``tandem bench latency --profile``: where a step's time goes, by phase and by kind of op.

One extra batch runs under ``torch.profiler`` (CPU activity). Phases come from the spans the
engine marks (tandem/profiling.py: schedule, prepare_inputs, lm_head, sample, update, outputs);
inside the forward, forward hooks mark each module (a ``Linear`` is a matmul, ``Attention`` the
attention block, ``MLP`` the activation, the decoder layer its norms and residual adds), and
the ops of the attention block are told apart by name (KV gather, KV write, the attention
itself, layout copies, the rest). Each op's self time goes to its innermost mark; steps are split into
prefill steps (some prompt was still pending) and decode steps. Profiling adds overhead to every
op, so read the shares, not the absolute times.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from tandem.profiling import SPAN_PREFIX

STEP_SPAN = SPAN_PREFIX + "step."
MODULE_SPAN = SPAN_PREFIX + "module."
# innermost module mark -> category (the attention block is split further by op name)
MODULE_CATEGORIES = {"Linear": "matmul", "ShardedLinear": "matmul", "MLP": "activation",
                     "DecoderLayer": "norm_and_residual", "RMSNorm": "norm_and_residual",
                     "RotaryEmbedding": "rope", "VocabEmbedding": "embedding",
                     "LlamaModel": "embedding"}
ATTENTION_OPS = [(re.compile(r"rope_and_write_kv"), "rope_and_kv_write"),  # tandem_cpu's fused op
                 (re.compile(r"index_select|gather"), "kv_gather"),
                 (re.compile(r"index_put|index_copy|scatter"), "kv_write"),
                 (re.compile(r"scaled_dot_product|softmax|bmm|matmul|_flash_attention|paged_decode_attention"), "attention"),
                 (re.compile(r"copy_|clone|contiguous|cat|stack"), "attention_layout_copies")]


def _attention_category(op: str) -> str:
    return next((cat for pattern, cat in ATTENTION_OPS if pattern.search(op)), "attention_other")


@contextlib.contextmanager
def module_marks(model: nn.Module) -> Iterator[None]:
    """While active, every module's forward runs inside a ``tandem::module.<Class>`` span."""
    open_spans: list[record_function] = []

    def enter(module: nn.Module, _args: Any) -> None:
        span = record_function(MODULE_SPAN + type(module).__name__)
        span.__enter__()
        open_spans.append(span)

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        open_spans.pop().__exit__(None, None, None)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _category(marks: list[str], op: str) -> str:
    """marks: the tandem spans around an op, innermost first."""
    for mark in marks:
        if mark.startswith(MODULE_SPAN):
            cls = mark.removeprefix(MODULE_SPAN)
            if cls == "Attention":
                return _attention_category(op)
            if cls in MODULE_CATEGORIES:
                return MODULE_CATEGORIES[cls]
        elif not mark.startswith(STEP_SPAN):
            return mark.removeprefix(SPAN_PREFIX)  # an engine phase: schedule, sample, ...
    return "other"


def breakdown(events: Any) -> dict[str, dict[str, Any]]:
    """Profiler events -> per step kind: steps, ms per step by category, shares."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    steps: dict[str, int] = defaultdict(int)
    for event in events:
        if event.name.startswith(STEP_SPAN):
            steps[event.name.removeprefix(STEP_SPAN)] += 1
        marks, parent = [], event
        while parent is not None:
            if parent.name.startswith(SPAN_PREFIX):
                marks.append(parent.name)
            parent = parent.cpu_parent
        kind = next((m.removeprefix(STEP_SPAN) for m in marks if m.startswith(STEP_SPAN)), None)
        if kind is not None and event.self_cpu_time_total > 0:  # marks include the event's own span
            totals[kind][_category(marks, event.name)] += event.self_cpu_time_total / 1e3
    report = {}
    for kind, ms in totals.items():
        total = sum(ms.values())
        per_step = {cat: round(v / steps[kind], 3) for cat, v in sorted(ms.items(), key=lambda kv: -kv[1])}
        report[kind] = {"steps": steps[kind], "ms_per_step": per_step,
                        "share": {cat: round(v / total, 4) for cat, v in sorted(ms.items(), key=lambda kv: -kv[1])}}
    return report


def profile_batch(engine: Any, model: nn.Module, submit: Any) -> dict[str, dict[str, Any]]:
    """Run one batch (``submit()`` adds its requests) to completion under the profiler."""
    submit()
    with module_marks(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished_requests():
            prompts_pending = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values())
            with record_function(STEP_SPAN + ("prefill" if prompts_pending else "decode")), torch.inference_mode():
                engine.step()
    return breakdown(prof.events())
