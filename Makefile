# `make test` and `make serve` work on a fresh machine: they install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install lint test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU build, so nothing later pulls the CUDA wheels
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,lint]"
	# tandem's C++ CPU kernels (tandem/kernels/csrc), built for this CPU; without a compiler torch serves
	$(PY) -m tandem.kernels.cpu_kernels || echo "warning: tandem's CPU kernels not built; the torch references will serve"
	touch $(STAMP)

# Types and style: both must report nothing (.ci/run runs this before the tests).
lint: install
	$(VENV)/bin/ruff check tandem tests scripts
	$(VENV)/bin/mypy

# The suite, with its total time and slowest tests at the end. Should the test process itself crash
# (abort, segfault), the test it was in and the stacks tests/conftest.py recorded are printed last.
test: install
	$(PY) -m pytest -q -ra --durations=15 -p no:faulthandler || { rc=$$?; if test -s .pytest-crash.log; then \
	  echo "== the test process crashed in: $$(cat .pytest-running)"; \
	  grep -E '^(Fatal|Current thread|Thread 0x)|File "[^"]*/(tests|tandem)/' .pytest-crash.log | head -40; fi; exit $$rc; }

# Serves the bundled demo model (models/tandem-demo) on http://127.0.0.1:8000 with the OpenAI API.
serve: install
	$(VENV)/bin/tandem serve --port $(or $(PORT),8000) --kv-cache-memory 256MiB

# Offline throughput on the ~88M-parameter random Llama of the engine benchmark (built on first use).
# scripts/bench_cpu_side_by_side.sh runs the same workload on vLLM's CPU build and transformers too.
BENCH_MODEL ?= .cache/bench-model
bench: install
	test -f $(BENCH_MODEL)/config.json || $(PY) -m tandem.testing $(BENCH_MODEL) --bench
	$(VENV)/bin/tandem bench throughput --model $(BENCH_MODEL) --dataset-name random --num-prompts 64 \
	  --input-len 288 --output-len 144 --random-range-ratio 0.75 --dtype float32

clean:
	rm -rf $(VENV) build *.egg-info
