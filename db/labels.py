"""Data access for labelled jobs: jobs generated and scored on both tiers (shadow-sampled traffic).

These are the training and replay data the system collects from its own traffic; ``routet2i data export``
writes them as a replay log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, aliased

from db.models import CostEntry, Generation, Job
from router.log import LogRecord
from router.types import QualityVector


@dataclass(frozen=True)
class LabelledJob:
    """One job with a scored image from each tier.

    Attributes:
        job_id: the job.
        prompt: its prompt.
        created_at: when it was submitted.
        edge: the edge generation's quality, ``{"metric_set": ..., "values": {...}}``.
        cloud: the cloud generation's quality.
        edge_model: model id of the edge generation.
        cloud_model: model id of the cloud generation.
        edge_usd: what the edge image cost (``None`` if it was never billed).
        cloud_usd: what the cloud image cost.
    """

    job_id: uuid.UUID
    prompt: str
    created_at: datetime
    edge: dict[str, Any]
    cloud: dict[str, Any]
    edge_model: str
    cloud_model: str
    edge_usd: float | None
    cloud_usd: float | None

    @property
    def metric_set(self) -> str:
        return str(self.edge.get("metric_set", "unspecified"))


def _scored(quality: Any) -> bool:
    # A JSON column may hold SQL NULL or a JSON null for "not scored"; only a non-empty vector counts.
    return isinstance(quality, dict) and isinstance(quality.get("values"), dict) and bool(quality["values"])


def iter_labelled_jobs(
    session: Session, *, metric_set: str | None = None, since: datetime | None = None, limit: int | None = None
) -> Iterator[LabelledJob]:
    """Jobs with scored generations on both tiers carrying the same metrics, oldest first.

    Args:
        session: an open session.
        metric_set: keep only pairs whose quality vectors both come from this metric set.
        since: keep only jobs created at or after this time.
        limit: stop after this many.
    """
    edge, cloud = aliased(Generation), aliased(Generation)
    edge_cost, cloud_cost = aliased(CostEntry), aliased(CostEntry)
    query = (
        select(Job, edge, cloud, edge_cost.usd, cloud_cost.usd)
        # An escalated job's edge image was sent to the cloud because it scored badly: a sample chosen by its
        # outcome would teach a router that the cloud wins more often than it does, so it is left out.
        .join(edge, and_(edge.job_id == Job.id, edge.tier == "edge", edge.role != "replaced"))
        .join(cloud, and_(cloud.job_id == Job.id, cloud.tier == "cloud"))
        .outerjoin(edge_cost, and_(edge_cost.job_id == Job.id, edge_cost.tier == "edge"))
        .outerjoin(cloud_cost, and_(cloud_cost.job_id == Job.id, cloud_cost.tier == "cloud"))
        .order_by(Job.created_at, Job.id)
    )
    if since is not None:
        query = query.where(Job.created_at >= since)
    count = 0
    for job, e, c, e_usd, c_usd in session.execute(query).yield_per(500):
        if limit is not None and count >= limit:
            return
        edge_q, cloud_q = e.quality, c.quality
        if edge_q is None or cloud_q is None or not (_scored(edge_q) and _scored(cloud_q)):
            continue
        if set(edge_q["values"]) != set(cloud_q["values"]):
            continue
        if metric_set is not None and (
            edge_q.get("metric_set") != metric_set or cloud_q.get("metric_set") != metric_set
        ):
            continue
        count += 1
        yield LabelledJob(
            job_id=job.id,
            prompt=job.prompt,
            created_at=job.created_at,
            edge=edge_q,
            cloud=cloud_q,
            edge_model=e.model_id,
            cloud_model=c.model_id,
            edge_usd=None if e_usd is None else float(e_usd),
            cloud_usd=None if c_usd is None else float(c_usd),
        )


class MixedMetricSets(ValueError):
    """Labelled jobs were scored with several metric sets, and none was chosen."""


def labelled_log_records(
    session: Session, *, metric_set: str | None = None, since: datetime | None = None, limit: int | None = None
) -> list[LogRecord]:
    """The labelled jobs (:func:`iter_labelled_jobs`) as replay-log records, oldest first: what ``routet2i data
    export`` writes and what ``routet2i learn`` trains on.

    Raises:
        MixedMetricSets: the jobs were scored with several metric sets and ``metric_set`` does not pick one.
    """
    jobs = list(iter_labelled_jobs(session, metric_set=metric_set, since=since, limit=limit))
    sets = sorted({job.metric_set for job in jobs})
    if len(sets) > 1:
        raise MixedMetricSets(f"labelled jobs were scored with several metric sets ({', '.join(sets)}); choose one")
    records = []
    for job in jobs:
        extra: dict[str, object] = {
            "source": "routet2i",
            "edge_model": job.edge_model,
            "cloud_model": job.cloud_model,
            "created_at": job.created_at.isoformat(),
        }
        if job.edge_usd is not None and job.cloud_usd is not None:
            extra["cost"] = {"edge": job.edge_usd, "cloud": job.cloud_usd}
        records.append(
            LogRecord(
                id=str(job.job_id),
                prompt=job.prompt,
                edge=QualityVector(job.edge["values"], metric_set=job.metric_set),
                cloud=QualityVector(job.cloud["values"], metric_set=job.metric_set),
                extra=extra,
            )
        )
    return records
