"""`tandem serve --speculative-config` (n-gram, a draft model and an EAGLE head) with the demo model
on a copy-heavy edit: the official openai SDK gets the text an engine without speculation gives
(plain and streamed, with a stop string), and /metrics has vLLM's spec_decode counters."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tandem import LLM, SamplingParams
from tandem.engine.arg_utils import DEMO_MODEL_DIR
from tests.helpers import start_server, stop_server


def _copy_prompt() -> str:
    text = (DEMO_MODEL_DIR / "heldout-sample.txt").read_text()[:900]
    return text + "\n\n" + text[:200]


# every proposal verified: the adaptive policy, tested on its own, could pick no drafts on a loaded machine
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "adaptive": False}
# the bundled draft for the demo model (scripts/train_draft_model.py)
DRAFT_MODEL = {"method": "draft_model", "model": str(DEMO_MODEL_DIR.parent / "tandem-demo-draft"),
               "num_speculative_tokens": 3, "adaptive": False}
# the bundled EAGLE head for the demo model (scripts/train_eagle.py)
EAGLE = {"method": "eagle", "model": str(DEMO_MODEL_DIR.parent / "tandem-demo-eagle"), "num_speculative_tokens": 3,
         "adaptive": False}


@pytest.mark.parametrize("config", [NGRAM, DRAFT_MODEL, EAGLE], ids=["ngram", "draft_model", "eagle"])
def test_speculative_server_matches_an_engine_without_it(config):
    prompt = _copy_prompt()
    plain = LLM(model=str(DEMO_MODEL_DIR), kv_cache_memory="16MiB")
    want = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0].text
    spec = json.dumps(config)
    proc, base = start_server(DEMO_MODEL_DIR, "--speculative-config", spec, "--kv-cache-memory", "16MiB")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0)
        assert r.choices[0].text == want and r.usage.completion_tokens == 60
        stop = want[20:26]  # a stop string inside the text: the output ends right before it
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=[stop], stream=True))
        assert streamed == want[:want.index(stop)]
        text = httpx.get(f"{base}/metrics").text
        drafts = re.search(r'^vllm:spec_decode_num_drafts_total\{model_name="tiny"\} ([0-9.e+]+)$', text, re.M)
        accepted = re.search(r'^vllm:spec_decode_num_accepted_tokens_total\{model_name="tiny"\} ([0-9.e+]+)$',
                             text, re.M)
        assert drafts and float(drafts.group(1)) > 0
        assert accepted and float(accepted.group(1)) > 0, "a copy of the text above is mostly accepted"
        assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in text
        after = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                         "temperature": 0})
        assert after.status_code == 200  # still serving
    finally:
        stop_server(proc)
