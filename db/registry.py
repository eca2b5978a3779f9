"""The model registry: every trained router a deployment has had, and which one routes now.

Each deployment router (a *slot*, ``ROUTET2I_ROUTER``) has at most one champion: the model its route workers load
(they look for a new one every few seconds and switch without a restart). ``routet2i learn`` registers each
challenger with its verdict and promotes it when it wins; an operator promotes or rolls back by hand
(``routet2i models``, ``/v1/models``). An artifact is stored in the database as a compressed tar of its
directory, so every worker reads the same bytes wherever it runs.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import RouterModel, utcnow

CHAMPION, RETIRED, CHALLENGER, CANDIDATE = "champion", "retired", "challenger", "candidate"


class RegistryError(ValueError):
    """An operation the registry refuses (an unknown model, nothing to roll back to)."""


def pack(directory: Path) -> bytes:
    """An artifact directory as a gzip-compressed tar, with stable names and times (same files, same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(directory)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def unpack(artifact: bytes, directory: Path) -> Path:
    """Write a packed artifact into ``directory`` (created; regular files only, no path leaves it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
        tar.extractall(directory, filter="data")
    return directory


@dataclass(frozen=True)
class NewModel:
    """A model to register (see :class:`db.models.RouterModel` for the fields)."""

    slot: str
    kind: str
    version: str
    encoder: str | None
    directory: Path
    source: str
    labels: int = 0
    trained_from: datetime | None = None
    trained_to: datetime | None = None
    evaluation: dict[str, Any] | None = None


def register(session: Session, model: NewModel, *, state: str = CANDIDATE) -> RouterModel:
    """Store ``model``'s artifact and figures (in the caller's transaction)."""
    artifact = pack(model.directory)
    row = RouterModel(
        slot=model.slot,
        kind=model.kind,
        version=model.version,
        sha256=hashlib.sha256(artifact).hexdigest(),
        encoder=model.encoder,
        artifact=artifact,
        state=state,
        source=model.source,
        labels=model.labels,
        trained_from=model.trained_from,
        trained_to=model.trained_to,
        evaluation=model.evaluation,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def champion(session: Session, slot: str) -> RouterModel | None:
    return session.scalars(select(RouterModel).where(RouterModel.slot == slot, RouterModel.state == CHAMPION)).first()


def champion_version(session: Session, slot: str) -> tuple[uuid.UUID, str] | None:
    """The champion's id and version, without its artifact (what a route worker asks every few seconds)."""
    row = session.execute(
        select(RouterModel.id, RouterModel.version).where(RouterModel.slot == slot, RouterModel.state == CHAMPION)
    ).first()
    return (row[0], row[1]) if row is not None else None


def latest_trained(session: Session, slot: str) -> RouterModel | None:
    """The slot's most recently registered model trained or chosen on labels (the learning loop's last step)."""
    return session.scalars(
        select(RouterModel)
        .where(RouterModel.slot == slot, RouterModel.labels > 0)
        .order_by(RouterModel.created_at.desc(), RouterModel.id)
        .limit(1)
    ).first()


def prior_of(session: Session, slot: str) -> RouterModel | None:
    """The prior the slot's learning loop started from (the first champion it chose), which its challengers are
    warm-started from."""
    return session.scalars(
        select(RouterModel)
        .where(RouterModel.slot == slot, RouterModel.source.like("prior:%"))
        .order_by(RouterModel.created_at, RouterModel.id)
        .limit(1)
    ).first()


def get_model(session: Session, model_id: uuid.UUID) -> RouterModel | None:
    return session.get(RouterModel, model_id)


def list_models(session: Session, *, slot: str | None = None, limit: int = 50) -> list[RouterModel]:
    """Models newest first."""
    query = select(RouterModel).order_by(RouterModel.created_at.desc(), RouterModel.id).limit(limit)
    if slot is not None:
        query = query.where(RouterModel.slot == slot)
    return list(session.scalars(query))


def promote(session: Session, model_id: uuid.UUID, *, by: str) -> RouterModel:
    """Make a model its slot's champion; the previous champion retires. Promoting the champion changes nothing."""
    model = session.get(RouterModel, model_id, with_for_update=True)
    if model is None:
        raise RegistryError(f"no model with id {model_id}")
    current = session.scalars(
        select(RouterModel).where(RouterModel.slot == model.slot, RouterModel.state == CHAMPION).with_for_update()
    ).first()
    if current is not None and current.id == model.id:
        return model
    now = utcnow()
    if current is not None:
        current.state, current.retired_at = RETIRED, now
        session.flush()  # the unique index allows one champion: the old one steps down first
    model.state, model.promoted_by, model.promoted_at, model.retired_at = CHAMPION, by, now, None
    session.flush()
    return model


def rollback(session: Session, slot: str, *, by: str) -> RouterModel:
    """Make the champion before the current one champion again (the most recently retired)."""
    previous = session.scalars(
        select(RouterModel)
        .where(RouterModel.slot == slot, RouterModel.state == RETIRED, RouterModel.retired_at.is_not(None))
        .order_by(RouterModel.retired_at.desc())
        .limit(1)
    ).first()
    if previous is None:
        raise RegistryError(f"no earlier champion of {slot!r} to roll back to")
    return promote(session, previous.id, by=by)


def model_summary(row: RouterModel) -> dict[str, Any]:
    """A model as the CLI and the API show it (without its artifact)."""
    return {
        "id": str(row.id),
        "slot": row.slot,
        "kind": row.kind,
        "version": row.version,
        "state": row.state,
        "sha256": row.sha256,
        "encoder": row.encoder,
        "source": row.source,
        "labels": row.labels,
        "trained_from": row.trained_from.isoformat() if row.trained_from else None,
        "trained_to": row.trained_to.isoformat() if row.trained_to else None,
        "evaluation": row.evaluation,
        "promoted_by": row.promoted_by,
        "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None,
        "retired_at": row.retired_at.isoformat() if row.retired_at else None,
        "created_at": row.created_at.isoformat(),
        "size_bytes": len(row.artifact),
    }
