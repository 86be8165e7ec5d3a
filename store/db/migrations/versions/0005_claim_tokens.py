"""jobs.claim_token: a random token per claim, which every lease-holder write must name

`lease_owner` (hostname-pid, or TID_WORKER_NAME) says who runs a job, for people; it does not
tell two claims apart: a worker restarted in a container with the same hostname and pid, or two
workers given the same name, could renew or finish a job another claim holds. The token is new
with each claim and stays until the next one, so a worker whose lease ran out can still write
its attempt's outcome as long as nobody claimed the job again. Existing rows get none (NULL):
a job claimed before this revision is matched on its NULL token.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in place: a batch recreate of `jobs` on SQLite would cascade deletes to its child tables
    with op.batch_alter_table("jobs", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("claim_token")
