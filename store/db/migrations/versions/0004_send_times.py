"""last_sent_at, send_count on jobs, datasets and models: when each one's message was last sent

The reconciler used to re-send every queued job older than `TID_REQUEUE_AFTER_SECONDS` on each
pass, so a long backlog grew the queue without bound, and it never re-sent a dataset's or a
model's check. Knowing whether and when a row's message was sent, it re-sends only what may
really be lost (store/db/sends.py). Rows already waiting were sent when they began to wait (or
re-sent by the reconciler since), so the upgrade records that send; the rest have none.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> (its waiting state, the column that says since when it waits)
WAITING = {
    "jobs": ("queued", "queued_at"),
    "datasets": ("pending", "created_at"),
    "models": ("pending", "created_at"),
}


def upgrade() -> None:
    for table, (state, since) in WAITING.items():
        # in place: a batch recreate of `jobs` is a DROP TABLE of the old copy on SQLite, which
        # deletes, with foreign keys on, every row that cascades from it
        with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
            batch_op.add_column(sa.Column("last_sent_at", sa.DateTime(timezone=True)))
            batch_op.add_column(
                sa.Column("send_count", sa.Integer(), nullable=False, server_default="0")
            )
        op.execute(
            sa.text(
                f"UPDATE {table} SET last_sent_at = {since}, send_count = 1 WHERE state = :state"
            ).bindparams(state=state)
        )


def downgrade() -> None:
    for table in WAITING:
        with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
            batch_op.drop_column("send_count")
            batch_op.drop_column("last_sent_at")
