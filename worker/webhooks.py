"""The webhook dispatcher (``routet2i webhooks``): posts each job's terminal states to its webhook, signed.

Deliveries come from the outbox the job's terminal transition wrote (:mod:`db.webhooks`). The dispatcher claims
the due ones (several dispatchers may run: rows are claimed with ``SKIP LOCKED`` and held for a while), posts
each from a pool of threads with a timeout, records every attempt, and schedules a failed one again with a
doubling wait. A receiver that is down or slow only holds the threads posting to it, for the timeout, and
delays no job.

Each request carries the job's status document (the one ``GET /v1/jobs/<id>`` answers) as
``{"event": "job.<state>", "delivery": ..., "job": ...}`` and the headers ``RouteT2I-Event``,
``RouteT2I-Delivery`` and ``RouteT2I-Signature: t=<unix time>,v1=<hex>``, where ``v1`` is the HMAC-SHA256 of
``"<t>.<body>"`` under the tenant's webhook secret (as Stripe signs its webhooks): a receiver recomputes it,
compares in constant time and refuses a ``t`` far from its clock (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import httpx
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.documents import job_document
from db.models import utcnow
from db.session import make_engine, make_session_factory, transaction
from db.webhooks import claim_due, delivery_target, record_attempt, webhook_host

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "RouteT2I-Signature"
ERROR_CHARS = 300
"""The start of a receiver's error answer kept in the attempt's record."""


def sign(secret: str, body: bytes, at: int) -> str:
    """The ``RouteT2I-Signature`` header of ``body`` sent at unix time ``at``."""
    digest = hmac.new(secret.encode(), str(at).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def retry_at(settings: Settings, attempts: int, now: datetime) -> datetime | None:
    """When a delivery that failed ``attempts`` times is tried again; None when its attempts ran out."""
    if attempts >= settings.webhook_max_attempts:
        return None
    wait = min(settings.webhook_retry_max_s, settings.webhook_retry_s * 2 ** (attempts - 1))
    return now + timedelta(seconds=wait)


class Dispatcher:
    """Claims due deliveries and posts them from ``concurrency`` threads."""

    def __init__(self, settings: Settings, *, concurrency: int = 8) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.sessions: sessionmaker[Session] = make_session_factory(make_engine(settings.database_url))
        # No redirects are followed: a webhook goes to the host its tenant was allowed, nowhere else.
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        """Dispatch until :meth:`stop`."""
        while not self.stopping.is_set():
            if self.dispatch_due() == 0:
                self.stopping.wait(self.settings.webhook_poll_s)

    def stop(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True)
        self.http.close()

    def dispatch_due(self) -> int:
        """Claim as many due deliveries as there are free threads and start posting them; returns how many."""
        with self.lock:
            free = self.concurrency - self.in_flight
        if free <= 0:
            return 0
        # Held for twice the timeout: if this process dies with them, another takes them after that.
        with transaction(self.sessions) as session:
            ids = claim_due(session, now=utcnow(), limit=free, hold_s=2 * self.settings.webhook_timeout_s + 5)
        with self.lock:
            self.in_flight += len(ids)
        for delivery_id in ids:
            self.pool.submit(self._deliver, delivery_id)
        return len(ids)

    def _deliver(self, delivery_id: uuid.UUID) -> None:
        try:
            self.deliver(delivery_id)
        except Exception:  # the delivery stays pending; its hold lapses and it is tried again
            log.exception("webhook delivery crashed", extra={"delivery": str(delivery_id)})
        finally:
            with self.lock:
                self.in_flight -= 1

    def deliver(self, delivery_id: uuid.UUID) -> bool:
        """Post one delivery and record the attempt; returns whether the receiver took it (2xx)."""
        with self.sessions() as session:
            found = delivery_target(session, delivery_id)
            if found is None or found[0].state != "pending":
                return False
            delivery, job, tenant = found
            payload = {
                "event": f"job.{delivery.event}",
                "delivery": str(delivery.id),
                "job": job_document(session, job).model_dump(mode="json"),
            }
            url, event, allowed, secret = (
                delivery.url,
                delivery.event,
                tenant.allowed_webhook_hosts,
                tenant.webhook_secret,
            )
        status, error, took_ms = self._post(url, event, delivery_id, payload, allowed, secret)
        with transaction(self.sessions) as session:
            attempts = (found[0].attempts or 0) + 1
            later = None if status is not None and 200 <= status < 300 else retry_at(self.settings, attempts, utcnow())
            record_attempt(session, delivery_id, status_code=status, error=error, duration_ms=took_ms, retry_at=later)
        delivered = status is not None and 200 <= status < 300
        log.info(
            "webhook delivered" if delivered else "webhook attempt failed",
            extra={"delivery": str(delivery_id), "job_id": str(job.id), "status": status, "error": error},
        )
        return delivered

    def _post(
        self,
        url: str,
        event: str,
        delivery_id: uuid.UUID,
        payload: Mapping[str, object],
        allowed: frozenset[str],
        secret: str | None,
    ) -> tuple[int | None, str | None, float]:
        """Post ``payload``; returns the receiver's status (None: not reached), an error, and the time taken."""
        if secret is None:
            return None, "the tenant has no webhook secret (routet2i tenant webhooks)", 0.0
        try:
            host = webhook_host(url)
        except ValueError as exc:
            return None, f"not a webhook URL: {exc}", 0.0
        if host not in allowed:  # the operator withdrew the host since the job was submitted
            return None, f"host {host!r} is no longer allowed for the tenant's webhooks", 0.0
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "RouteT2I-webhooks",
            "RouteT2I-Event": f"job.{event}",
            "RouteT2I-Delivery": str(delivery_id),
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
        }
        started = time.perf_counter()
        try:
            response = self.http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS], (time.perf_counter() - started) * 1000
        took_ms = (time.perf_counter() - started) * 1000
        error = None if response.is_success else response.text[:ERROR_CHARS] or response.reason_phrase
        return response.status_code, error, took_ms
