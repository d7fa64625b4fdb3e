"""lm-evaluation-harness against `tandem serve`: its `local-completions` backend must score and
generate exactly as its `hf` backend does on the same model (the bundled demo model), for the
three request kinds every task is made of: loglikelihood (a multiple-choice task),
loglikelihood_rolling (perplexity) and generate_until. A small local task (jsonl + YAML), no
download. Also lm-eval's remote tokenizer, through /tokenizer_info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.engine.arg_utils import DEMO_MODEL_DIR
from tests.helpers import REPO_ROOT, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval")

MAX_LENGTH = 256
MC = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
      {"question": "import", "choices": [" os", " the", " 42"], "answer": 0},
      {"question": "for i in range(10):\n   ", "choices": [" print(i)", " pass", " return"], "answer": 0}]
ROLLING = [{"text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"},
           {"text": "class Stack:\n    def __init__(self):\n        self.items = []\n"}]
GEN = [{"prompt": "def fibonacci(n):\n", "target": ""}, {"prompt": "import os\nimport", "target": ""},
       {"prompt": "class Point:\n    def __init__(self, x, y):\n", "target": ""}]


def _task(root: Path, name: str, docs: list[dict], body: str) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    _task(root, "tandem_mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
          'doc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n')
    _task(root, "tandem_rolling", ROLLING, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
          'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    _task(root, "tandem_gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
          'doc_to_target: "{{target}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n'
          '  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
    return root


@pytest.fixture(scope="module")
def server():
    proc, base = start_server(DEMO_MODEL_DIR, "--enable-tokenizer-info-endpoint", served_names=())
    yield base
    stop_server(proc)


def _evaluate(model: str, model_args: dict, tasks: Path) -> dict[str, list]:
    """task -> each sample's raw responses, in document order. lm-eval (datasets, pyarrow, its HTTP
    client, its own torch model) runs in a child process: whatever it does to a process stays there."""
    out = tasks / f"{model}.json"
    child = subprocess.run([sys.executable, __file__, model, json.dumps(model_args), str(tasks), str(out)],
                           capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.returncode == 0, f"lm-eval ({model}) exited with {child.returncode}:\n{child.stderr[-4000:]}"
    return json.loads(out.read_text())


def _evaluate_here(model: str, model_args: dict, tasks: Path) -> dict[str, list]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = simple_evaluate(model=model, model_args=model_args, tasks=["tandem_mc", "tandem_rolling", "tandem_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True, batch_size=1,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return {name: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for name, samples in out["samples"].items()}


if __name__ == "__main__":  # the child of _evaluate: MODEL MODEL_ARGS_JSON TASKS_DIR OUT_JSON
    model_name, args_json, tasks_dir, out_path = sys.argv[1:5]
    Path(out_path).write_text(json.dumps(_evaluate_here(model_name, json.loads(args_json), Path(tasks_dir))))


def _flat_numbers(resps) -> list[float]:
    """Every loglikelihood in lm-eval's nested responses (is_greedy flags left out)."""
    if isinstance(resps, bool):
        return []
    if isinstance(resps, (int, float)):
        return [float(resps)]
    return [x for r in resps for x in _flat_numbers(r)]


def test_local_completions_equals_the_hf_backend(server, tasks):
    demo = str(DEMO_MODEL_DIR)
    # both backends condition on the BOS token the tokenizer adds (lm-eval's API default leaves it out)
    hf = _evaluate("hf", {"pretrained": demo, "dtype": "float32", "device": "cpu", "max_length": MAX_LENGTH,
                         "add_bos_token": True}, tasks)
    api = _evaluate("local-completions", {"base_url": f"{server}/v1/completions", "model": demo, "tokenizer": demo,
                                          "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": True,
                                          "max_length": MAX_LENGTH + 1, "max_retries": 1, "num_concurrent": 1},
                    tasks)
    for name in ("tandem_mc", "tandem_rolling"):
        got, want = _flat_numbers(api[name]), _flat_numbers(hf[name])
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, abs=1e-3), name
        assert all(x != 0.0 for x in got), name  # echo really scored the prompt
    assert api["tandem_gen"] == hf["tandem_gen"]
    assert any(r[0][0] for r in api["tandem_gen"])  # something was generated


def test_remote_tokenizer_reads_tokenizer_info(server):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(server)
    tok = RemoteTokenizer(server)
    assert tok.eos_token == "<|eos|>" and tok.bos_token == "<|bos|>"
    ids = tok.encode("def f():")
    assert tok.decode(ids) == "def f():"
