"""mAP as the API serves it, derived from the `evaluations` table, the one place it is stored: a
job's `best_ap`, the `eval/AP`... entries of its latest metrics, and the `eval/AP`... points
among its metric points.

The points of `GET /v1/jobs/{id}/metrics` are the `metrics` rows and, for each evaluation, one
point per COCO statistic, in logging order: an evaluation comes right after the newest metric
row logged before it, i.e. the newest row of an earlier attempt or of its own attempt at its
step or before (steps only grow within an attempt, so later rows never move it). A point's `id`
is its position in that order, the cursor `after_id` takes: a metric row's id times
`POINT_STRIDE`, and an evaluation's points the positions just after the row it follows.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from api.schemas import MetricPoint
from store.db.models import Evaluation, Metric
from tid_core.events import COCO_STATS

# positions per metric row: the row's own, then room for the points of the evaluations that
# follow it (170 of them; more than one only when restarts evaluate again before a step is logged)
POINT_STRIDE = 1024


def point_name(stat: str) -> str:
    return f"eval/{stat}"


def stat_points(evaluation: Evaluation) -> dict[str, float]:
    """The evaluation's statistics by point name (those COCO could measure)."""
    values = {point_name(stat): getattr(evaluation, stat.lower()) for stat in COCO_STATS}
    return {name: value for name, value in values.items() if value is not None}


class MapSummary(NamedTuple):
    best_ap: float | None
    latest: Evaluation | None  # the newest evaluation


NOT_EVALUATED = MapSummary(best_ap=None, latest=None)


def summaries(session: Session, job_ids: list[str]) -> dict[str, MapSummary]:
    """Each evaluated job's best AP and newest evaluation, in one query for a page of jobs."""
    per_job = (
        select(
            Evaluation.job_id,
            func.max(Evaluation.ap).label("best_ap"),
            func.max(Evaluation.id).label("latest_id"),
        )
        .where(Evaluation.job_id.in_(job_ids))
        .group_by(Evaluation.job_id)
        .subquery()
    )
    rows = session.execute(
        select(per_job.c.best_ap, Evaluation).join(Evaluation, Evaluation.id == per_job.c.latest_id)
    )
    return {evaluation.job_id: MapSummary(best_ap, evaluation) for best_ap, evaluation in rows}


def metric_points(
    session: Session, job_id: str, *, name: str | None, after_id: int, limit: int
) -> tuple[list[MetricPoint], list[Evaluation]]:
    """The job's first `limit` points after position `after_id` (of `name` only, if given),
    and all its evaluations, oldest first."""
    query = select(Metric).where(Metric.job_id == job_id, Metric.id > after_id // POINT_STRIDE)
    if name:
        query = query.where(Metric.name == name)
    points = [
        MetricPoint(
            id=row.id * POINT_STRIDE,
            attempt=row.attempt,
            step=row.step,
            name=row.name,
            value=row.value,
        )
        for row in session.scalars(query.order_by(Metric.id).limit(limit))
    ]
    follows = (  # the newest metric row logged before the evaluation
        select(func.max(Metric.id))
        .where(
            Metric.job_id == Evaluation.job_id,
            or_(
                Metric.attempt < Evaluation.attempt,
                and_(Metric.attempt == Evaluation.attempt, Metric.step <= Evaluation.step),
            ),
        )
        .correlate(Evaluation)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Evaluation, follows).where(Evaluation.job_id == job_id).order_by(Evaluation.id)
    ).all()
    after_row: Counter[int] = Counter()  # evaluations placed after each metric row so far
    for evaluation, row_id in rows:
        follows_row = row_id or 0  # 0: before the job's first metric row
        first = follows_row * POINT_STRIDE + 1 + after_row[follows_row] * len(COCO_STATS)
        after_row[follows_row] += 1
        for offset, stat in enumerate(COCO_STATS):
            value = getattr(evaluation, stat.lower())
            position = first + offset
            if value is None or position <= after_id or (name and name != point_name(stat)):
                continue
            points.append(
                MetricPoint(
                    id=position,
                    attempt=evaluation.attempt,
                    step=evaluation.step,
                    name=point_name(stat),
                    value=value,
                )
            )
    points.sort(key=lambda point: point.id)
    return points[:limit], [evaluation for evaluation, _ in rows]
