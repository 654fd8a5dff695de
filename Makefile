# fourbit developer commands.
#   make test   create .venv if needed, install fourbit with its dev extra, run ruff and pytest
#   make demo   the demo: all-MiniLM-L6-v2 in NF4/FP4 against fp32 (its own venv, .venv-demo)
#   make bench  the kernel benchmark table for this machine
#   make test-torch  the suite on the oldest supported torch (OLD_TORCH), in .venv-torch
# TORCH_SPEC pins the torch wheel installed before the package; override it for another build
# that the dev extra's packages accept. TEST_JOBS is the pytest processes (pytest-xdist; 0
# runs the tests in pytest's own process).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TEST_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_VENV ?= .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python

.PHONY: test test-torch demo bench lint clean

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

# The suite on another torch (default the oldest supported): a venv of its own with the package
# and the test dependencies installed without theirs, so that nothing replaces that torch;
# transformers, peft and the demo's tests skip there (numpy below 2.3, as checked with torch 2.5.1).
OLD_TORCH ?= torch==2.5.1
OLD_VENV ?= .venv-torch
OLD_PY := $(OLD_VENV)/bin/python
test-torch:
	test -x $(OLD_PY) || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip --disable-pip-version-check -q install "$(OLD_TORCH)" "numpy<2.3" pytest pytest-xdist hypothesis safetensors tqdm
	$(OLD_PY) -m pip --disable-pip-version-check -q install --no-deps -e . bitsandbytes==0.50.2
	$(OLD_PY) -m pytest -q -n $(TEST_JOBS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(OLD_VENV) .pytest_cache .ruff_cache .hypothesis build src/*.egg-info
