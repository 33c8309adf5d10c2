# Two commands: `make demo` and `make test`. Both create .venv and install everything first:
# Python packages only, nothing system-wide (the browser of tests/test_browser.py is installed by
# .ci/run; those tests skip without it). `make lint` (ruff + mypy, part of `make test`), `make docs`
# (the site, into site/).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install demo lint docs test test-fast test-slow bench clean

LINT_PATHS := src tests benchmarks examples scripts

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(VENV)/bin/batchnorm build-ext || echo "(the layers run their Python step instead)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchnorm lab run ioffe2015-fig1 --quick --out $(OUT)
	@echo "Report: $(OUT)/ioffe2015-fig1/report.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow" tests

test-fast: test

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache build *.egg-info src/*.egg-info
