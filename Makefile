# Quick start: `make demo` and `make test` on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.scldiff-installed

.PHONY: install demo test lint docs tutorials benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the local CPU wheel, not gigabytes of CUDA packages
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	# the CPU sampler's kernels into numba's on-disk cache: no generate() compiles them later
	$(PY) -c "import scldiff.sampling; scldiff.sampling.compile_kernels()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m scldiff.demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tutorials

docs: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	rm -rf docs/generated
	# warnings are errors; offline, conf.py leaves the intersphinx links out and says so
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	$(PY) docs/check_api.py

# re-run the tutorial notebooks in place (their outputs are committed; docs do not execute)
tutorials: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	$(VENV)/bin/jupyter-execute --inplace tutorials/*.ipynb

benchmark: $(STAMP)
	$(PY) benchmarks/quality.py --threads 1

clean:
	rm -rf $(VENV) demo_output docs/_build .pytest_cache
