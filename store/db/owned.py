"""Rows by owner: the one rule every process applies to what a caller may see or use."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from store.db.models import Dataset, Job, Model

Owned = TypeVar("Owned", Job, Dataset, Model)


def find_owned(session: Session, table: type[Owned], row_id: str, *, owner: str) -> Owned | None:
    """The row if it exists and belongs to `owner`: another owner's row is as good as absent."""
    row = session.get(table, row_id)
    return row if row is not None and row.owner == owner else None
