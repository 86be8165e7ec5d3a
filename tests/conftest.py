"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from store.db.migrate import upgrade


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP spin-waits stall badly (10-100x) when
    the few cores are shared with other processes (the trainer tests' subprocesses included)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once per test process; the API's and the workers'
    tests each get a copy of it (`databases.copy_sqlite`): a migration run takes about a second
    on a busy 2-core host, a copy milliseconds. The migrations' own tests run them."""
    path = tmp_path_factory.mktemp("migrated") / "tid.db"
    upgrade(f"sqlite:///{path}")
    return path
