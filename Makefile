# Two commands do everything on a fresh clone:
#   make repro   set up, then run the whole pipeline (dvc repro) on the built-in digits
#   make test    set up, then run the test suite
# Set-up is a virtual environment in .venv, installed from the pinned requirements.lock; it is
# redone only when requirements.lock changes. It uses the first Python of the supported versions
# that runs here (3.11, 3.12, 3.13); PYTHON=/path/to/python overrides.

SUPPORTED_PYTHONS := 3.11 3.12 3.13
PYTHON ?= $(shell for v in $(SUPPORTED_PYTHONS); do python$$v -c '' >/dev/null 2>&1 && { echo python$$v; break; }; done)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-from-lock

# Stages call `python` and `dvc`: make them the virtual environment's.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: setup repro test test-fast bench check-deploy ui plots plots-diff clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock
	@if [ -z "$(PYTHON)" ]; then echo "make: no supported Python found: install Python 3.11, 3.12 or 3.13, or set PYTHON=/path/to/python" >&2; exit 1; fi
	@echo "set-up: $(PYTHON) ($$($(PYTHON) --version 2>&1)) -> $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --requirement requirements.lock
	touch $@

repro: setup  ## run every stage that is out of date
	dvc repro

test: setup  ## the test suite (unit tests, failure cases, an end-to-end dvc repro); prints the 10 slowest
	python -m pytest -n 2 --dist loadfile

test-fast: setup  ## the edit loop: unit and failure-case tests, no training runs or dvc repro (about a minute)
	python -m pytest -n 2 -m "not slow"

bench: setup  ## the benchmark suite: one table, figures in bench/results.json (run it on a quiet machine)
	python -m bench $(BENCH_ARGS)

check-deploy: setup  ## exit 1 unless the gate allowed deployment (used by CI)
	python -m pipeline.gate --check --out metrics/gate.json

ui: setup  ## the MLflow UI for this project's runs, on http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# DVC's page loads Vega from a CDN; this template has it inline, so the page renders offline too.
PLOTS_TEMPLATE := .dvc/tmp/plots-offline.html

$(PLOTS_TEMPLATE): $(STAMP) pipeline/plots_page.py
	python -m pipeline.plots_page $@

plots: setup $(PLOTS_TEMPLATE)  ## render the DVC plots (curves, confusion matrices, pictures) to dvc_plots/index.html
	dvc plots show --html-template $(PLOTS_TEMPLATE)

plots-diff: setup $(PLOTS_TEMPLATE)  ## REVS="HEAD exp-a exp-b": the plots of several revisions side by side
	dvc plots diff --html-template $(PLOTS_TEMPLATE) $(REVS)

clean-venv:
	rm -rf $(VENV)
