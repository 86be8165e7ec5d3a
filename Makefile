# One entry point for people and CI. `make test` and `make demo` build .venv on first use
# (reused afterwards; rebuilt when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-faults lint typecheck unit fuzz checks bench bench-full demo demo-local clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[core,service,dev]"
	@touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

# Three pytest workers on two cores: many tests wait on subprocesses (trainers, workers,
# servers, leases), so a third keeps the cores busy (the whole CI suite 17:44 -> 15:45 here,
# the cores then 96% busy: a fourth would only queue). The schema fuzz runs in a process of
# its own: schemathesis gives its 18 operation tests one node id, and xdist tells tests apart
# by node id (a mixed `-n 2 --dist load` run reported 1 of the 18). It and mypy are one busy
# process each, so `checks` runs the two side by side (about 3 -> 2 min on 2 cores).
XDIST := -n 3 --dist worksteal
FUZZ := tests/api/test_schema_fuzz.py

# MARKS: which tests `unit` selects; `.ci/run` empties it to add the fault matrix to the same
# three-worker pool (one pool packs the long tests better than two runs one after the other)
MARKS ?= not faults

unit: venv
	$(PY) -m pytest -q $(XDIST) --durations=15 -m "$(MARKS)" --ignore=$(FUZZ)

fuzz: venv
	$(PY) -m pytest -q $(FUZZ)

checks: venv
	@$(MAKE) --no-print-directory -j2 --output-sync=target typecheck fuzz

test: lint checks unit

# the fault matrix (docs/RELIABILITY.md): minutes, each test on its own private PostgreSQL and
# Redis servers (free ports, own directories), so two run at once
test-faults: venv
	$(PY) -m pytest -q $(XDIST) --durations=5 -m faults tests/integration/test_faults.py

# benchmarks (docs/BENCHMARKS.md): `bench` is a smoke run of each script at tiny sizes,
# `bench-full` the documented sizes, with the figures in var/bench/*.json. PYTHONPATH: the
# scripts run this checkout's code even where the venv's editable install points elsewhere.
BENCH := overhead coco_eval api ddp accuracy

bench: venv
	@for b in $(BENCH); do echo "== bench/$$b.py --quick"; \
	  PYTHONPATH=$(CURDIR) $(PY) bench/$$b.py --quick || exit 1; done

bench-full: venv
	@mkdir -p var/bench
	@for b in $(BENCH); do echo "== bench/$$b.py"; \
	  PYTHONPATH=$(CURDIR) $(PY) bench/$$b.py --json var/bench/$$b.json || exit 1; done

demo: venv
	$(VENV)/bin/tid demo

demo-local: venv
	$(PY) -m tid_core.demo

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
