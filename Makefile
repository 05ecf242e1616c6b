VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint test test-gpu demo bench clean

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
	$(PY) scripts/offline_generate.py

bench:
	$(PY) scripts/bench/serve_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
