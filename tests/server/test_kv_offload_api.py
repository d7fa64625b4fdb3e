"""`tandem serve --kv-offloading-size --kv-disk-path`: through the official openai SDK, a revisited
prompt is answered from the host tier (cached tokens in its usage, tier hits in /metrics), and a
restarted server answers it from disk with the same text."""

from __future__ import annotations

import json
import re

import httpx
import openai

from tests.helpers import prompts_for, start_server, stop_server

POOL = ("--num-gpu-blocks-override", "24", "--block-size", "16", "--kv-offloading-size", "0.01")


def _metric(base: str, name: str, labels: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    match = re.search(rf'^{re.escape(name)}_total{{{re.escape(labels)}}} ([0-9.e+]+)$', text, re.M)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match.group(1))


def _complete(base: str, prompts: list[list[int]]) -> list[tuple[str, int]]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    out = []
    for p in prompts:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
        details = r.usage.prompt_tokens_details
        out.append((r.choices[0].text, details.cached_tokens if details else 0))
    return out


def test_revisits_come_from_the_host_tier_then_from_disk_after_a_restart(model_dirs, tmp_path):
    model = model_dirs["llama3-gqa"]
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = prompts_for(vocab, lengths=[150, 170, 140, 160], seed=11)
    disk_flags = ("--kv-disk-path", str(tmp_path), "--kv-disk-size", "0.01")
    proc, base = start_server(model, *POOL, *disk_flags)
    try:
        first = _complete(base, prompts)
        second = _complete(base, prompts)
        assert [t for t, _ in second] == [t for t, _ in first]
        assert all(cached >= 128 for _, cached in second), second  # whole blocks, from a tier or the device
        from_cpu = _metric(base, "tandem:kv_offload_hit_tokens", 'medium="CPU"')
        assert from_cpu > 0
        by_source = 'model_name="tiny",source="external_kv_transfer"'
        assert _metric(base, "vllm:prompt_tokens_by_source", by_source) == from_cpu
    finally:
        stop_server(proc)
    proc, base = start_server(model, *POOL, *disk_flags)
    try:
        again = _complete(base, prompts)
        assert [t for t, _ in again] == [t for t, _ in first]
        assert _metric(base, "tandem:kv_offload_hit_tokens", 'medium="DISK"') >= 128 * len(prompts)
    finally:
        stop_server(proc)
