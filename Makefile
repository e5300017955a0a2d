# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs into .venv (first time only) and runs the main job
#   make test   installs into .venv (first time only) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python demos/super_resolution.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -m "slow or not slow"

benchmark: $(VENV)/.installed
	$(BIN)/python benchmarks/gaussian_exactness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
