"""Webhook deliveries: an outbox written with each terminal state of a job that has a webhook, and a log of every
attempt to send it (:mod:`worker.webhooks` sends them).

Because the delivery is inserted in the transaction that ends the job, a job never ends without its delivery
being recorded, and a delivery never exists for a state that was rolled back.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import Job, Tenant, WebhookAttempt, WebhookDelivery, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def webhook_host(url: str) -> str:
    """The ``host`` or ``host:port`` (lower case) a webhook URL calls; ValueError unless it is an absolute http(s)
    URL without credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return parts.hostname.lower() if port is None else f"{parts.hostname.lower()}:{port}"


def enqueue_delivery(session: Session, job: Job, event: str) -> WebhookDelivery:
    """Record that ``job``'s state ``event`` is to be posted to its webhook (in the caller's transaction)."""
    assert job.webhook_url is not None
    now = utcnow()
    delivery = WebhookDelivery(
        job_id=job.id, event=event, url=job.webhook_url, state=PENDING, attempts=0, next_attempt_at=now, created_at=now
    )
    session.add(delivery)
    return delivery


def claim_due(session: Session, *, now: datetime, limit: int, hold_s: float) -> list[uuid.UUID]:
    """Up to ``limit`` pending deliveries due by ``now``, oldest first, held for ``hold_s`` (their next attempt is
    moved that far ahead, so a dispatcher that dies with them lets another take them after it). On PostgreSQL,
    rows another dispatcher is claiming are skipped."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed = list(session.scalars(query))
    for delivery in claimed:
        delivery.next_attempt_at = now + timedelta(seconds=hold_s)
    return [delivery.id for delivery in claimed]


def delivery_target(session: Session, delivery_id: uuid.UUID) -> tuple[WebhookDelivery, Job, Tenant] | None:
    """A delivery with its job and the job's tenant (whose secret signs it and whose hosts it may call)."""
    row = session.execute(
        select(WebhookDelivery, Job, Tenant)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(WebhookDelivery.id == delivery_id)
    ).first()
    return (row[0], row[1], row[2]) if row is not None else None


def record_attempt(
    session: Session,
    delivery_id: uuid.UUID,
    *,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
    retry_at: datetime | None,
) -> WebhookDelivery | None:
    """Log one attempt and settle the delivery: delivered on a 2xx, else pending until ``retry_at`` (None: the
    attempts ran out, it failed). Returns the delivery, or None if it no longer exists."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        return None
    now = utcnow()
    delivery.attempts += 1
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            at=now,
            status_code=status_code,
            error=error,
            duration_ms=round(duration_ms, 3),
        )
    )
    if status_code is not None and 200 <= status_code < 300:
        delivery.state, delivery.delivered_at = DELIVERED, now
    elif retry_at is None:
        delivery.state = FAILED
    else:
        delivery.next_attempt_at = retry_at
    return delivery


def list_deliveries(session: Session, *, job_id: uuid.UUID) -> list[WebhookDelivery]:
    """The job's deliveries, oldest first, with their attempts."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        .options(selectinload(WebhookDelivery.attempt_log))
    )
    return list(session.scalars(query))
