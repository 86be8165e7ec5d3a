"""datasets.deliveries, models.deliveries: how many times each one's check was delivered

A check whose input kills the worker that runs it (an upload that exhausts memory) came back
with every redelivery (`task_reject_on_worker_lost`), killing worker after worker; counted in
the row, a check delivered past `TID_CHECK_MAX_DELIVERIES` fails the resource instead.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("datasets", "models")


def upgrade() -> None:
    for table in TABLES:
        # in place: a batch recreate of a table is a DROP TABLE of the old copy on SQLite
        with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
            batch_op.add_column(
                sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0")
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
            batch_op.drop_column("deliveries")
