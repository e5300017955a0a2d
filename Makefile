# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs into .venv (first time only) and runs the main job
#   make test   installs into .venv (first time only) and runs the test suite
# and `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all docs benchmark benchmark-quick clean

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

# The documentation site (mkdocs.yml: docs/ and the API reference from the docstrings), built
# strictly (a warning, such as a broken link, fails it) into site/.
# The `docs` extra (mkdocs, mkdocstrings) is in `test` too; this installs it where it is missing.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(BIN)/python -m mkdocs build --strict --site-dir site

# The benchmarks' own dependencies (deepinv, BM3D, matplotlib): the `benchmark` extra.
$(VENV)/.benchmark-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[benchmark]"
	touch $@

# Every benchmark (`python -m benchmarks.NAME` from the repository root), each writing its
# report (and figures) under docs/: about two and a half hours on 2 CPU cores.
BENCHMARKS := gaussian_exactness run_benchmarks image_restoration particle_mode training_curve speed denoising_start warm_start
QUICK_OUT := /tmp/posterior-diff-benchmarks

benchmark: $(VENV)/.benchmark-installed
	$(BIN)/python -m benchmarks.gaussian_exactness
	$(BIN)/python -m benchmarks.run_benchmarks
	$(BIN)/python -m benchmarks.image_restoration --figure docs/image_restoration.png
	$(BIN)/python -m benchmarks.particle_mode
	$(BIN)/python -m benchmarks.training_curve
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.denoising_start
	$(BIN)/python -m benchmarks.warm_start

# A smoke run of every benchmark: each one's --quick mode, reports under $(QUICK_OUT).
benchmark-quick: $(VENV)/.benchmark-installed
	for name in $(BENCHMARKS); do $(BIN)/python -m benchmarks.$$name --quick --out $(QUICK_OUT)/$$name.md || exit 1; done

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis
