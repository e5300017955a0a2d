# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs into .venv (first time only) and runs the main job
#   make test   installs into .venv (first time only) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all benchmark benchmark-quick clean

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

# Every benchmark, each writing its tables (and figures) under docs/: about 1h15 on 2 CPU cores.
benchmark: $(VENV)/.installed
	PYTHONPATH=. $(BIN)/python benchmarks/gaussian_exactness.py
	PYTHONPATH=. $(BIN)/python -m benchmarks.run_benchmarks
	PYTHONPATH=. $(BIN)/python -m benchmarks.particle_mode
	PYTHONPATH=. $(BIN)/python -m benchmarks.training_curve

# A smoke run of the comparisons against deepinv and of particle mode (writes to /tmp).
benchmark-quick: $(VENV)/.installed
	PYTHONPATH=. $(BIN)/python -m benchmarks.run_benchmarks --quick --out /tmp/posterior-diff-benchmarks/benchmarks.md
	PYTHONPATH=. $(BIN)/python -m benchmarks.particle_mode --quick --out /tmp/posterior-diff-benchmarks/particle_mode.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
