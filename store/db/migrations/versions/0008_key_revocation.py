"""api_keys.expires_at, datasets.bytes and event_streams: key expiry and per-owner limits

A key may now expire (revocation already had its column); an uploaded dataset records what it
unpacked to, for the owner's storage quota; `event_streams` counts open event streams per owner
across every API process.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in place (SQLite has ADD and DROP COLUMN): a batch recreate would copy the tables
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("datasets", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "event_streams",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("event_streams", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_event_streams_owner"), ["owner"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("event_streams", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_streams_owner"))
    op.drop_table("event_streams")
    with op.batch_alter_table("datasets", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("bytes")
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("expires_at")
