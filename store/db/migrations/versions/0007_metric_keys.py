"""One metric row per (job, step, name): deduplicate, then a unique index the ingest upserts on

A resumed attempt logs again every step after its checkpoint, and each of those steps used to
add a second row, so the series the API serves (and the dashboard plots) held two values for one
step, and nothing could tell a duplicate from a lost row. The key is (job_id, step, name)
without `attempt`: a job's series is indexed by step across its attempts, and with `attempt` in
the key every resume would still duplicate its re-logged steps (only repeats within one attempt,
such as an orphan's events ingested under the next attempt's number, would be caught). The
`attempt` column stays as the attempt that logged the kept value. The upgrade keeps, of each
group of duplicates, the row of the latest attempt (the newest row within it): the value the
resumed run, whose weights continued, logged. It is a unique index rather than a constraint
because SQLite adds one in place (no batch recreate of `metrics`), and ON CONFLICT uses either.
The downgrade drops the index; the deleted duplicates are not restored.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ux_metrics_job_id_step_name"


def upgrade() -> None:
    op.execute(
        "DELETE FROM metrics WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER ("
        "PARTITION BY job_id, step, name ORDER BY attempt DESC, id DESC) AS newness"
        " FROM metrics) AS ranked WHERE newness > 1)"
    )
    with op.batch_alter_table("metrics", schema=None, recreate="never") as batch_op:
        batch_op.create_index(INDEX, ["job_id", "step", "name"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None, recreate="never") as batch_op:
        batch_op.drop_index(INDEX)
