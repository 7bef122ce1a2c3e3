# Two commands do everything on a fresh clone:
#   make repro   set up, then run the whole pipeline (dvc repro) on the built-in digits
#   make test    set up, then run the test suite
# Set-up is a virtual environment in .venv that uv makes exactly what uv.lock says (a sync: a
# package that leaves the lock leaves the venv); it is redone only when uv.lock or pyproject.toml
# changes, the venv's python stops running, or PYTHON= names another Python version. Bytecode is compiled at install, as pip does (with PYTHONDONTWRITEBYTECODE set, Python
# would compile TensorFlow on every import: 8 s instead of 3.5), with compileall on every core and
# without the packages' own test suites, which nothing here imports (uv's --compile-bytecode
# compiles those too: make setup took 38 s instead of 28 s on 2 cores). uv comes from PATH, or is
# installed once into .tools/ with this Python's pip. The venv uses the first Python of the
# supported versions that runs here (3.11, 3.12, 3.13); PYTHON=/path/to/python overrides.
# `make lock` updates uv.lock after pyproject.toml changes.

SUPPORTED_PYTHONS := 3.11 3.12 3.13
PYTHON ?= $(shell for v in $(SUPPORTED_PYTHONS); do python$$v -c '' >/dev/null 2>&1 && { echo python$$v; break; }; done)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# EXTRAS=s3 adds pyproject.toml's optional extras of that name (a DVC remote on S3).
EXTRAS ?=
STAMP := $(VENV)/.synced-from-lock$(EXTRAS:%=-%)
UV_VERSION := 0.13.9
UV_HOME := $(abspath .tools/uv)
UV_BOOTSTRAP := $(UV_HOME)/bin/uv
# There from the start of a set-up to its end: a set-up stopped part-way (Ctrl-C during uv sync) can
# leave a package half installed that uv, seeing its metadata, would not install again; the next
# set-up reinstalls every package from uv's cache instead (seconds, no download).
UNFINISHED := .tools/set-up-unfinished
UV ?= $(or $(shell command -v uv 2>/dev/null),$(UV_BOOTSTRAP))

# make splits words at spaces, targets and paths alike: refuse such a folder in one line.
ifneq ($(word 2,$(CURDIR)),)
$(error the project's path has a space ("$(CURDIR)"), which make cannot handle: move or clone it to a path without one)
endif
# The set-up is redone when the venv's python no longer runs (the Python it was made from was removed
# or upgraded), or when PYTHON= on the command line names another Python version than the venv's.
python_version = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
STALE_VENV :=
ifneq ($(wildcard $(STAMP)),)
VENV_PYTHON_VERSION := $(call python_version,$(BIN)/python)
ifeq ($(VENV_PYTHON_VERSION),)
STALE_VENV := stale-venv
else ifeq ($(origin PYTHON),command line)
ifneq ($(VENV_PYTHON_VERSION),$(call python_version,$(PYTHON)))
STALE_VENV := stale-venv
endif
endif
endif

# Stages call `python` and `dvc`: make them the virtual environment's. uv never downloads a Python
# of its own here (the one chosen above is used) and leaves the venv where the Makefile says.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export UV
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS := never
# MLflow's usage reports to its makers stay off for `make ui` as for the stages (pipeline/__init__.py),
# unless the caller's environment says otherwise.
MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_DISABLE_TELEMETRY

.PHONY: setup lock upgrade repro test test-fast bench check-deploy ui docs plots plots-diff clean-venv stale-venv

setup: $(STAMP)

$(STAMP): uv.lock pyproject.toml $(STALE_VENV) | $(UV)
	@if [ -z "$(PYTHON)" ]; then echo "make: no supported Python found: install Python 3.11, 3.12 or 3.13, or set PYTHON=/path/to/python" >&2; exit 1; fi
	@echo "set-up: $(PYTHON) ($$($(PYTHON) --version 2>&1)) -> $(VENV), with $$($(UV) --version)"
	rm -f $(VENV)/.synced-from-lock*
	@mkdir -p $(dir $(UNFINISHED)); if [ -e $(UNFINISHED) ]; then \
		echo "set-up: the last set-up stopped part-way (interrupted?): every package is installed again"; \
		echo --reinstall > $(UNFINISHED); else : > $(UNFINISHED); fi
	$(UV) sync --locked --python "$$(command -v $(PYTHON))" --quiet $(EXTRAS:%=--extra %) $$(cat $(UNFINISHED))
	$(BIN)/python -m compileall -q -j 0 -x 'site-packages/.*/tests?/' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null \
		|| echo "set-up: some files did not compile to bytecode; Python compiles them as they are imported"
	rm -f $(UNFINISHED)
	touch $@

stale-venv:   # a prerequisite only when the venv must be set up again (above)

# Only when uv is not on PATH: this Python's pip installs it into .tools/, once.
$(UV_BOOTSTRAP):
	@if [ -z "$(PYTHON)" ]; then echo "make: no supported Python found: install Python 3.11, 3.12 or 3.13, or set PYTHON=/path/to/python" >&2; exit 1; fi
	PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(UV_HOME) "uv==$(UV_VERSION)"

lock: | $(UV)  ## after editing pyproject.toml's dependencies: resolve again and rewrite uv.lock (hashes included)
	$(UV) lock

upgrade: | $(UV)  ## PACKAGE=name: move one locked package to its newest release that pyproject.toml allows
	@if [ -z "$(PACKAGE)" ]; then echo "make upgrade: name the package, e.g. make upgrade PACKAGE=mlflow" >&2; exit 2; fi
	$(UV) lock --upgrade-package "$(PACKAGE)"

repro: setup  ## run every stage that is out of date
	dvc repro

test: setup  ## the test suite (unit tests, failure cases, an end-to-end dvc repro); prints the 10 slowest
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup  ## the edit loop: unit and failure-case tests, no training runs or dvc repro (about a minute)
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

bench: setup  ## the benchmark suite: one table, figures in bench/results.json (run it on a quiet machine)
	python -m bench $(BENCH_ARGS)

check-deploy: setup  ## exit 1 unless the gate allowed deployment (2: no decision, or deploy/ lacks its model; used by CI)
	python -m pipeline.gate --check --out metrics/gate.json

UI_PORT ?= 5000
ui: setup  ## the MLflow UI for this project's runs; prints the address of the training runs view first
	@python -m pipeline.ui --store mlflow.db --url http://127.0.0.1:$(UI_PORT)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

docs: setup  ## the documentation site: regenerate the params reference, the benchmark and cross-validation tables, then mkdocs build --strict into site/
	python -m docs.params_reference
	python -m docs.bench_tables
	python -m docs.crossval_table
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict   # without it, Material prints a banner about its successor

# DVC's page loads Vega from a CDN; this template has it inline, so the page renders offline too.
PLOTS_TEMPLATE := .dvc/tmp/plots-offline.html

$(PLOTS_TEMPLATE): $(STAMP) pipeline/plots_page.py
	python -m pipeline.plots_page $@

plots: setup $(PLOTS_TEMPLATE)  ## render the DVC plots (curves, confusion matrices, pictures) to dvc_plots/index.html
	dvc plots show --html-template $(PLOTS_TEMPLATE)

plots-diff: setup $(PLOTS_TEMPLATE)  ## REVS="HEAD exp-a exp-b": the plots of several revisions side by side
	dvc plots diff --html-template $(PLOTS_TEMPLATE) $(REVS)

clean-venv:
	rm -rf $(VENV) .tools
