# fourbit developer commands.
#   make test   create .venv if needed, install fourbit with its dev extra, run ruff and pytest
#   make demo   the demo: all-MiniLM-L6-v2 in NF4/FP4 against fp32 (its own venv, .venv-demo)
#   make bench  the kernel benchmark table for this machine
# TORCH_SPEC pins the torch wheel installed before the package; override it for another build,
# e.g. make test TORCH_SPEC="torch==2.5.1". TEST_JOBS is the pytest processes (pytest-xdist; 0
# runs the tests in pytest's own process).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TEST_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_VENV ?= .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python

.PHONY: test demo bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q -n $(TEST_JOBS)

$(DEMO_VENV)/.installed: pyproject.toml
	test -x $(DEMO_PY) || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)"
	$(DEMO_PY) -m pip --disable-pip-version-check -q install -e ".[demo]"
	touch $@

demo: $(DEMO_VENV)/.installed
	$(DEMO_PY) -m fourbit demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .ruff_cache .hypothesis build src/*.egg-info
