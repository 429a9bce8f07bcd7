# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test lint notebooks lab bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dcal_app demo

# The whole suite: unit/invariant tests, then every notebook under nbval (outputs compared).
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout=600
test: lint
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q -p no:cacheprovider $(NBVAL) notebooks

notebooks: $(STAMP)
	$(PY) tools/run_notebooks.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

LINT_PATHS := dcal diagnostics dcal_app dcal_studies tests benchmarks tools notebooks/*.py
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf runs .pytest_cache
