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

serve: install
	$(VENV)/bin/tandem generate --prompt "def fibonacci(n):" --max-tokens 48

bench: install
	$(VENV)/bin/tandem bench throughput --dataset-name random --num-prompts 64 --input-len 288 --output-len 144 --random-range-ratio 0.75

clean:
	rm -rf $(VENV) build *.egg-info
