# `make run` executes every notebook (figures in runs/figures); `make test` runs the tests;
# `make test-fast` all but those marked slow (notebooks, trainings, large architectures) or
# browser (a page of headless Chromium, which `make test` installs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# set up: the package and what the notebooks need (make run); dev adds the tests' libraries
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)  # root in CI: apt-get as it is

.PHONY: setup dev run test test-fast lint bench docs browser

setup: $(STAMP)

# --no-compile: pip would byte-compile every file it installs (torch's and CUDA's ~4 GB
# included), about half of set-up's CPU time; Python compiles what a run imports (and keeps it
# unless PYTHONDONTWRITEBYTECODE is set, as on this project's CI machine: 10 s per kernel)
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

run: setup
	$(BIN)/gradcam-tut run --out runs

docs: setup  # run every notebook and keep readable copies in docs/notebooks (committed)
	$(BIN)/gradcam-tut run --out runs --publish docs/notebooks

test: dev lint browser
	$(BIN)/python -m pytest -q

# the edit-test loop. One torch thread: the tests' tensors are tiny, and on a busy machine two
# threads per process spin-wait for each other (3x the CPU time, 5x the wall time measured)
test-fast: dev lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not browser"

browser:  # tests/test_audit.py opens report.html in headless Chromium (Debian's package)
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq chromium; }

lint: dev  # ruff, then mypy over the package (pyproject.toml's [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: dev
	$(BIN)/python benchmarks/bench_gradcam.py
