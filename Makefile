# One entry point for people and CI. `make test` and `make demo` build .venv on first use
# (reused afterwards; rebuilt when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-faults lint typecheck unit demo demo-local clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[core,service,dev]"
	@touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q

test: lint typecheck unit

# the fault matrix (docs/RELIABILITY.md): minutes, on private PostgreSQL/Redis servers
test-faults: venv
	$(PY) -m pytest -q -m faults tests/integration/test_faults.py

demo: venv
	$(VENV)/bin/tid demo

demo-local: venv
	$(PY) -m tid_core.demo

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
