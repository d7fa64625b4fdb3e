# `make test` and `make serve` work on a fresh machine: they install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU build, so nothing later pulls the CUDA wheels
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -ra

# Until the bundled demo model and the HTTP server land, `serve` builds a tiny random Llama locally
# and completes a prompt with it offline (the text is gibberish: the weights are random).
DEMO_MODEL ?= .cache/demo-model
serve: install
	test -f $(DEMO_MODEL)/model.safetensors || $(PY) -m tandem.testing $(DEMO_MODEL) --preset llama3-gqa
	$(VENV)/bin/tandem generate $(DEMO_MODEL) --prompt "def fibonacci(n):" --max-tokens 48 --kv-cache-memory 64MiB

bench: install
	$(VENV)/bin/tandem bench throughput --dataset-name random --num-prompts 64 --input-len 288 --output-len 144 --random-range-ratio 0.75

clean:
	rm -rf $(VENV) build *.egg-info
