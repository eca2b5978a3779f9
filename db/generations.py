"""Data access for generated images and the cost ledger."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import CostEntry, Generation, Job


def record_generation(
    session: Session,
    *,
    job: Job,
    tier: str,
    role: str,
    backend: str,
    model_id: str,
    device: str,
    seed: int,
    steps: int,
    width: int,
    height: int,
    image_path: str,
    image_sha256: str,
    wall_s: float,
    gpu_s: float,
    cost_usd: float,
    quality: dict[str, Any] | None,
) -> Generation:
    """Store one image and bill it, in the caller's transaction.

    The unique keys on ``(job_id, tier)`` of both tables make a second record for the same job and tier fail
    at commit, which is how a redelivered task learns that the work was already done.
    """
    generation = Generation(
        id=uuid.uuid4(),
        job_id=job.id,
        tier=tier,
        role=role,
        backend=backend,
        model_id=model_id,
        device=device,
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        image_path=image_path,
        image_sha256=image_sha256,
        wall_s=wall_s,
        gpu_s=gpu_s,
        quality=quality,
    )
    session.add(generation)
    session.add(
        CostEntry(
            job_id=job.id,
            generation=generation,
            tier=tier,
            usd=Decimal(str(round(cost_usd, 6))),
            gpu_s=gpu_s,
        )
    )
    return generation


def get_generation(session: Session, *, job_id: uuid.UUID, tier: str) -> Generation | None:
    return session.scalars(select(Generation).where(Generation.job_id == job_id, Generation.tier == tier)).first()


def primary_generation(session: Session, *, job_id: uuid.UUID) -> Generation | None:
    return session.scalars(select(Generation).where(Generation.job_id == job_id, Generation.role == "primary")).first()


def job_costs(session: Session, *, job_id: uuid.UUID) -> list[CostEntry]:
    return list(session.scalars(select(CostEntry).where(CostEntry.job_id == job_id).order_by(CostEntry.id)))
