VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint test test-gpu demo bench bench-vllm clean

install:
	VENV=$(VENV) bash scripts/install.sh

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m gpu

demo:
	$(PY) scripts/demo.py

bench:
	$(PY) scripts/bench/serve_throughput.py

VLLM_VENV ?= .venv-vllm

bench-vllm:
	VLLM_VENV=$(VLLM_VENV) bash scripts/install_vllm.sh
	$(PY) scripts/bench/vs_vllm.py --vllm-venv $(VLLM_VENV)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
