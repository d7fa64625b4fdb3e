"""`tandem serve` with Mixture-of-Experts models (the tiny Qwen3-MoE, gpt-oss and DeepSeek-V3 presets):
the official openai SDK gets transformers' greedy tokens, and /metrics reports the experts' load
imbalance."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers import hf_greedy, prompts_for, start_server, stop_server


@pytest.mark.parametrize("preset", ["qwen3-moe", "gpt-oss", "deepseek-v3"])
def test_a_moe_model_serves_and_reports_expert_load(model_dirs, preset):
    model = model_dirs[preset]
    proc, base = start_server(model)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = prompts_for(512, [21], seed=6)[0]
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        want = AutoTokenizer.from_pretrained(str(model)).decode(hf_greedy(str(model), prompt, 8),
                                                                skip_special_tokens=True)
        assert r.choices[0].text == want
        text = httpx.get(f"{base}/metrics").text
        count = re.search(r'^tandem:moe_expert_load_imbalance_count\{model_name="tiny"\} ([0-9.e+]+)$', text, re.M)
        assert count and float(count.group(1)) >= 1, "one sample per sparse layer at least"
    finally:
        stop_server(proc)
