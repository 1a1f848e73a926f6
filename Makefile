# The two set-up commands the README promises:
#   make demo   -> virtual environment + project + `posttrain demo`
#   make test   -> virtual environment + project + test extras + system packages (bubblewrap) + pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A normal torch release; on machines with the CPU wheel on local disk pip takes that file.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test system-deps clean

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

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
