"""Data access for generated images and the cost ledger."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from db.models import CostEntry, Generation, Job, utcnow


@dataclass(frozen=True)
class NewGeneration:
    """One image to store and bill (see :class:`db.models.Generation` for the fields)."""

    job_id: uuid.UUID
    tier: str
    role: str
    backend: str
    model_id: str
    device: str
    seed: int
    steps: int
    width: int
    height: int
    image_path: str
    image_sha256: str
    wall_s: float
    gpu_s: float
    cost_usd: float
    quality: dict[str, Any] | None


_INSERT_GENERATION = insert(cast(Table, Generation.__table__))
_INSERT_COST = insert(cast(Table, CostEntry.__table__))


def record_generations(session: Session, generations: Sequence[NewGeneration]) -> list[uuid.UUID]:
    """Store images and bill them, in the caller's transaction: one INSERT per table for all of them.

    The unique keys on ``(job_id, tier)`` of both tables make a second record for the same job and tier fail
    at commit, which is how a redelivered task learns that the work was already done.

    Returns:
        The new generations' ids, in order.
    """
    if not generations:
        return []
    now = utcnow()
    ids = [uuid.uuid4() for _ in generations]
    images = [
        {
            "id": gid,
            "job_id": g.job_id,
            "tier": g.tier,
            "role": g.role,
            "backend": g.backend,
            "model_id": g.model_id,
            "device": g.device,
            "seed": g.seed,
            "steps": g.steps,
            "width": g.width,
            "height": g.height,
            "image_path": g.image_path,
            "image_sha256": g.image_sha256,
            "wall_s": g.wall_s,
            "gpu_s": g.gpu_s,
            "quality": g.quality,
            "created_at": now,
        }
        for gid, g in zip(ids, generations, strict=True)
    ]
    costs = [
        {
            "job_id": g.job_id,
            "generation_id": gid,
            "tier": g.tier,
            "usd": Decimal(str(round(g.cost_usd, 6))),
            "gpu_s": g.gpu_s,
            "created_at": now,
        }
        for gid, g in zip(ids, generations, strict=True)
    ]
    session.execute(_INSERT_GENERATION, images if len(images) > 1 else images[0])
    session.execute(_INSERT_COST, costs if len(costs) > 1 else costs[0])
    return ids


def record_generation(session: Session, *, job: Job, **fields: Any) -> uuid.UUID:
    """Store one image of ``job`` and bill it (:func:`record_generations`; ``fields`` as :class:`NewGeneration`'s).

    Returns:
        The generation's id.
    """
    session.flush()  # the job row must exist before its image's row refers to it
    (generation_id,) = record_generations(session, [NewGeneration(job_id=job.id, **fields)])
    return generation_id


def get_generation(session: Session, *, job_id: uuid.UUID, tier: str) -> Generation | None:
    return session.scalars(select(Generation).where(Generation.job_id == job_id, Generation.tier == tier)).first()


def replaced_generation(session: Session, *, job_id: uuid.UUID) -> Generation | None:
    """The image of ``job_id`` that an escalation replaced, if any."""
    return session.scalars(select(Generation).where(Generation.job_id == job_id, Generation.role == "replaced")).first()


def primary_generation(session: Session, *, job_id: uuid.UUID) -> Generation | None:
    return session.scalars(select(Generation).where(Generation.job_id == job_id, Generation.role == "primary")).first()


def job_costs(session: Session, *, job_id: uuid.UUID) -> list[CostEntry]:
    return list(session.scalars(select(CostEntry).where(CostEntry.job_id == job_id).order_by(CostEntry.id)))
