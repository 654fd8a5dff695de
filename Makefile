# fourbit developer commands.
#   make test   create .venv if needed, install fourbit with its dev extra, run ruff and pytest
#   make demo   the demo (a random 4096x4096 matrix quantized: error, size, time)
#   make bench  the kernel benchmark table for this machine
# TORCH_SPEC pins the torch wheel installed before the package; override it for another build,
# e.g. make test TORCH_SPEC="torch==2.5.1".

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

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
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) examples/quantize_random.py

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build src/*.egg-info
