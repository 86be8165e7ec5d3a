"""The import rules between packages (pyproject.toml's import-linter contracts) catch a
forbidden import: each case adds one to a copy of the tree and expects that contract broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tid_core", "api", "store", "cli", "worker", "bench")
LINT = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("static"))
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the copy (PYTHONPATH first, ahead of this checkout's install)."""
    return subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("api/app.py", "import torch", "the HTTP app imports neither"),
        ("api/routes/jobs.py", "import tid_core.models", "the HTTP app imports neither"),
        ("api/deps.py", "import worker.runner", "the HTTP app imports neither"),
        ("tid_core/spec.py", "import torch", "the JobSpec imports neither"),
        ("tid_core/spec.py", "import tid_core.distill.tid", "the JobSpec imports neither"),
        ("tid_core/events.py", "import tid_core.engine", "the trainer's event types import no"),
        ("tid_core/engine.py", "import store.settings", "the training core imports nothing"),
        ("store/db/models.py", "import api.app", "the shared state imports neither"),
        ("store/queue.py", "import torch", "the shared state imports neither"),
        ("worker/runner.py", "import cli.client", "the worker imports neither"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(f"{original}\n{line}\n")
    try:
        result = lint(tree)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    assert any(contract in row for row in broken), result.stdout
