"""Resources the API holds for its lifetime, built once in :func:`api.app.create_app`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis
from celery import Celery
from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.images import ImageStore

if TYPE_CHECKING:
    from api.auth import KeyCache, Principal
    from api.schemas import JobBatchCreateBase, JobCreateBase
    from db.redis_state import RateLimiter, SpendLedger

EXTENSION = "routet2i"


@dataclass
class ApiState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    images: ImageStore
    redis: redis.Redis
    job_create_model: type[JobCreateBase]
    job_batch_model: type[JobBatchCreateBase]
    key_cache: KeyCache
    rate_limiter: RateLimiter
    spend_ledger: SpendLedger | None = field(default=None)
    """The deployment's cloud spend per period, when a spend limit is set."""
    image_waits: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(16))
    """One slot per ``POST /v1/images/generations`` this process may hold while it waits (``images_waiters``)."""
    url_signing_key: bytes | None = field(default=None)
    """The signed image URLs' key, once loaded (``api.openai_compat.signing_key``)."""
    local_principal: Principal | None = field(default=None)
    openapi: dict[str, Any] | None = field(default=None)


def state() -> ApiState:
    return cast(ApiState, current_app.extensions[EXTENSION])
