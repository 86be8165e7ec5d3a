"""Settings that contradict each other are refused at start-up, naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from store.settings import Settings


@pytest.mark.parametrize("check_seconds", [7200, 9000])
def test_a_check_that_may_outlast_the_visibility_timeout_is_refused(
    tmp_path: Path, check_seconds: float
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_root=tmp_path, check_seconds=check_seconds, broker_visibility_seconds=7200)

    assert (
        f"TID_CHECK_SECONDS ({check_seconds}) must be below TID_BROKER_VISIBILITY_SECONDS (7200)"
        in str(refused.value)
    )


def test_a_check_within_the_visibility_timeout_is_accepted(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path, check_seconds=7199, broker_visibility_seconds=7200)

    assert settings.check_seconds < settings.broker_visibility_seconds
