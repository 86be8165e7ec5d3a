"""`tid reconcile --loop` outlives any failed pass: a dead reconciler leaves lost jobs lost."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import cli.main
import worker.reconcile
from cli.main import RECONCILE_MAX_BACKOFF_SECONDS, reconcile_loop
from store.settings import Settings


def test_the_loop_logs_a_failed_pass_backs_off_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[BaseException | None] = [
        RuntimeError("a bug in a pass"),
        RuntimeError("the same bug again"),
        None,
        OperationalError("SELECT", {}, Exception("connection refused")),
        None,
    ]
    passes: list[Settings] = []

    def reconcile(*, settings: Settings) -> dict[str, int]:
        passes.append(settings)
        outcome = outcomes[len(passes) - 1]
        if outcome is not None:
            raise outcome
        return {}

    sleeps: list[float] = []
    monkeypatch.setattr(worker.reconcile, "reconcile", reconcile)
    monkeypatch.setattr(cli.main.time, "sleep", sleeps.append)
    settings = Settings(data_root=tmp_path, reconcile_seconds=2)

    with caplog.at_level(logging.INFO, logger="tid.reconcile"):
        reconcile_loop(settings, passes=len(outcomes))

    assert len(passes) == len(outcomes)
    # doubling after each failed pass, back to the usual pace after one that worked; a
    # database outage is waited out at the usual pace
    assert sleeps == [4, 8, 2, 2, 2]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2 and all(r.exc_info for r in failures)  # with the traceback
    assert "RuntimeError: a bug in a pass" in caplog.text
    assert "database unavailable" in caplog.text


def test_the_backoff_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def reconcile(*, settings: Settings) -> dict[str, int]:
        raise KeyError("a row it cannot handle")

    sleeps: list[float] = []
    monkeypatch.setattr(worker.reconcile, "reconcile", reconcile)
    monkeypatch.setattr(cli.main.time, "sleep", sleeps.append)

    reconcile_loop(Settings(data_root=tmp_path, reconcile_seconds=10), passes=40)

    assert sleeps[:5] == [20, 40, 80, 160, 300]
    assert max(sleeps) == sleeps[-1] == RECONCILE_MAX_BACKOFF_SECONDS
