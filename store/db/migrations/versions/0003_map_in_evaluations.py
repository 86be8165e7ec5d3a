"""mAP only in `evaluations`: drop jobs.best_ap and the eval/* metric rows it duplicates

Until now each evaluation was also stored as `eval/AP`... rows in `metrics` and as a running
maximum in `jobs.best_ap`; the API now derives both from `evaluations`. The upgrade deletes an
`eval/<stat>` metric row only where an evaluation of the same job, attempt and step holds the
same value, rather than all of them or none: an equal row is a pure copy, so nothing is lost,
while a row no evaluation holds (none should exist) stays and is still served as a metric
point. Filtering the rows out on every read instead would keep a second copy of mAP for good.
The downgrade re-creates `best_ap` and the eval/* rows from the evaluations (the re-created
rows come after the others in id order). The stat names are written out: a migration is a
snapshot and must not follow later code.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# metric name -> evaluations column
STATS = {f"eval/{name}": name.lower() for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def upgrade() -> None:
    for name, column in STATS.items():
        op.execute(
            sa.text(
                "DELETE FROM metrics WHERE name = :name AND EXISTS ("
                "SELECT 1 FROM evaluations e WHERE e.job_id = metrics.job_id"
                " AND e.attempt = metrics.attempt AND e.step = metrics.step"
                f" AND e.{column} = metrics.value)"
            ).bindparams(name=name)
        )
    # in place (SQLite 3.35+ has DROP COLUMN): batch mode's default would recreate `jobs`, and
    # SQLite's DROP TABLE of the old copy, with foreign keys on, deletes every job's rows in the
    # tables that cascade from it
    with op.batch_alter_table("jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("best_ap")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("best_ap", sa.Float(), nullable=True))
    op.execute(
        "UPDATE jobs SET best_ap = (SELECT max(e.ap) FROM evaluations e WHERE e.job_id = jobs.id)"
    )
    for name, column in STATS.items():
        op.execute(
            sa.text(
                "INSERT INTO metrics (job_id, attempt, step, name, value, created_at)"
                f" SELECT e.job_id, e.attempt, e.step, :name, e.{column}, e.created_at"
                f" FROM evaluations e WHERE e.{column} IS NOT NULL AND NOT EXISTS ("
                "SELECT 1 FROM metrics m WHERE m.job_id = e.job_id AND m.attempt = e.attempt"
                " AND m.step = e.step AND m.name = :name) ORDER BY e.id"
            ).bindparams(name=name)
        )
