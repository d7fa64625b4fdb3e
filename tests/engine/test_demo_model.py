"""The bundled demo model (models/tandem-demo): loads in transformers and tandem, is the default,
is far better than uniform on held-out text, and tandem's perplexity agrees with transformers'."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.cli import main
from tandem.engine.arg_utils import DEMO_MODEL_DIR, default_model_path
from tandem.eval.perplexity import score_texts, windows

WINDOW = 256
CARD = json.loads((DEMO_MODEL_DIR / "training_log.json").read_text())


@pytest.fixture(scope="module")
def demo_llm():
    llm = LLM(kv_cache_memory="64MiB")
    yield llm
    llm.llm_engine.assert_idle()


@pytest.fixture(scope="module")
def heldout_text() -> str:
    return (DEMO_MODEL_DIR / "heldout-sample.txt").read_text()


def test_files_and_size_limits():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 30 * 2**20
    assert "chat_template" in json.loads((DEMO_MODEL_DIR / "tokenizer_config.json").read_text())
    assert f"{CARD['results']['heldout_perplexity']:.2f}" in (DEMO_MODEL_DIR / "README.md").read_text()


def test_llm_without_model_uses_the_demo_model(demo_llm, monkeypatch):
    monkeypatch.delenv("TANDEM_MODEL", raising=False)
    assert default_model_path() == str(DEMO_MODEL_DIR)
    assert demo_llm.llm_engine.config.model.model == str(DEMO_MODEL_DIR)


def test_greedy_completion_looks_like_python(demo_llm):
    prompt = "def is_even(n):\n"
    out = demo_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    text = out.text
    assert "\n    " in prompt + text or text.startswith("    "), text  # indented body
    words = set(text.replace("(", " ").replace(":", " ").split())
    assert words & {"return", "if", "for", "self", "def", "not", "in", "is", "None", "raise"}, text


def test_chat_answers_with_code(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "Write a Python function `add`: Return a plus b."}],
                        SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    assert "def " in out or "return" in out, out


def test_perplexity_far_better_than_uniform_and_matches_transformers(demo_llm, heldout_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (ours,) = score_texts(demo_llm, {"heldout": heldout_text}, WINDOW)
    vocab = demo_llm.get_tokenizer().vocab_size
    assert ours.tokens_scored > 1000
    assert ours.perplexity < vocab / 50, (ours.perplexity, vocab)

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL_DIR), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(tok(heldout_text)["input_ids"], WINDOW):
            ids = torch.tensor([w])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
            count += len(w) - 1
    theirs = math.exp(nll / count)
    assert count == ours.tokens_scored
    assert abs(ours.perplexity - theirs) / theirs < 0.01, (ours.perplexity, theirs)


def test_eval_perplexity_cli(tmp_path, capsys, heldout_text):
    text = tmp_path / "sample.py"
    text.write_text(heldout_text[:3000])
    report = tmp_path / "ppl.json"
    rc = main(["eval", "perplexity", str(DEMO_MODEL_DIR), str(text), "--window", "128",
               "--kv-cache-memory", "32MiB", "--output-json", str(report)])
    assert rc == 0
    res = json.loads(report.read_text())
    assert res["window"] == 128 and 1 < res["perplexity"] < 8192 / 10  # far better than uniform
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "perplexity", str(DEMO_MODEL_DIR), str(tmp_path / "missing.txt")]) == 2


def test_windows_cover_every_token_once():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a lone last token scores nothing
    with pytest.raises(ValueError):
        windows(ids, 1)

