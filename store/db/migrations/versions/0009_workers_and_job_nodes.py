"""workers, job_nodes, jobs.nnodes and jobs.waiting_reason: one job across several workers

A job may now span `nnodes` workers (issue 24). `workers` is the registry the workers keep (a
heartbeat on the database's clock, idle or busy, what devices they offer), `job_nodes` the
worker and lease of each node of each attempt; `jobs.nnodes` is the spec's, for the queries that
place jobs (every existing job ran on one node), and `jobs.waiting_reason` says why a queued
job's gang has not formed.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in place: a batch recreate of `jobs` on SQLite would cascade deletes to its child tables
    with op.batch_alter_table("jobs", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("nnodes", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("queue", sa.String(length=256), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=False),
        sa.Column("device", sa.String(length=8), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "job_nodes",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_rank", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=False),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "attempt", "node_rank"),
    )


def downgrade() -> None:
    op.drop_table("job_nodes")
    op.drop_table("workers")
    with op.batch_alter_table("jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("waiting_reason")
        batch_op.drop_column("nnodes")
