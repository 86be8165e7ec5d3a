"""Benchmarks, run as scripts (`python bench/X.py`). A package so that mypy and uvicorn
(`bench.api:create_bare_app`) can name its modules."""
