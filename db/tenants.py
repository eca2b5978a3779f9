"""Data access for tenants and their API keys."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import ApiKey, Job, Tenant, utcnow

KEY_PREFIX = "rt2i_"
"""Every key starts with this, so leaked keys are easy to recognise (and to scan for)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(
    session: Session,
    *,
    name: str,
    is_admin: bool = False,
    cloud_budget: float | None = None,
    rate_limit_per_minute: int | None = None,
    forced_tiers: tuple[str, ...] = (),
) -> Tenant:
    tenant = Tenant(
        id=uuid.uuid4(),
        name=name,
        is_admin=is_admin,
        cloud_budget=cloud_budget,
        rate_limit_per_minute=rate_limit_per_minute,
        forced_tiers=",".join(forced_tiers),
        created_at=utcnow(),
    )
    session.add(tenant)
    return tenant


WEBHOOK_SECRET_PREFIX = "whsec_"


def set_webhooks(tenant: Tenant, *, hosts: tuple[str, ...], rotate_secret: bool = False) -> str | None:
    """Let ``tenant``'s jobs post webhooks to ``hosts`` (``host`` or ``host:port``; none: no webhooks). A tenant
    gets its webhook secret the first time (or a new one with ``rotate_secret``), returned then only."""
    tenant.webhook_hosts = ",".join(sorted({h.strip().lower() for h in hosts if h.strip()}))
    if tenant.webhook_secret is None or rotate_secret:
        tenant.webhook_secret = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
        return tenant.webhook_secret
    return None


def issue_api_key(session: Session, *, tenant: Tenant) -> str:
    """Create a key for ``tenant``; the plain key is returned once and only its hash is stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12], created_at=utcnow()))
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an active key, or None for an unknown or revoked key."""
    return session.scalars(
        select(Tenant).join(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).first()


def get_tenant(session: Session, tenant_id: uuid.UUID) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def list_keys(session: Session, *, tenant: Tenant) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)))


def revoke_keys(session: Session, *, tenant: Tenant, prefix: str | None = None) -> int:
    """Revoke the tenant's active keys (those starting with ``prefix`` when given); returns how many."""
    count = 0
    for key in list_keys(session, tenant=tenant):
        if key.revoked_at is None and (prefix is None or key.prefix.startswith(prefix[:12])):
            key.revoked_at = utcnow()
            count += 1
    return count


def delete_tenant(session: Session, tenant_id: uuid.UUID) -> set[uuid.UUID]:
    """Delete a tenant with every job of it (their history, decisions, images' records and costs go with them);
    returns the deleted jobs' ids. For throw-away tenants such as a benchmark's."""
    ids = set(session.scalars(select(Job.id).where(Job.tenant_id == tenant_id)))
    session.execute(delete(Job).where(Job.tenant_id == tenant_id))
    session.execute(delete(Tenant).where(Tenant.id == tenant_id))
    return ids
