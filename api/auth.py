"""Authentication: every ``/v1`` call carries ``Authorization: Bearer <key>``; the key names a tenant.

Looked-up keys are cached per process for ``settings.auth_cache_s`` seconds (so a revoked key keeps working
at most that long), which keeps a database round trip off every request.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import cast

import sqlalchemy.exc
from flask import g, request

from api.errors import ApiError
from api.state import state
from db.models import Tenant
from db.session import transaction
from db.tenants import create_tenant, get_tenant_by_name, hash_key, tenant_for_key

log = logging.getLogger(__name__)

LOCAL_TENANT = "local"
"""The tenant every request acts as when authentication is disabled."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as far as the API needs to know."""

    tenant_id: uuid.UUID
    tenant_name: str
    is_admin: bool
    cloud_budget: float | None
    rate_limit_per_minute: int | None
    forced_tiers: frozenset[str]
    webhook_hosts: frozenset[str] = frozenset()
    """Hosts (``host`` or ``host:port``, lower case) its jobs' webhooks may call."""

    @classmethod
    def of(cls, tenant: Tenant) -> Principal:
        return cls(
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            is_admin=tenant.is_admin,
            cloud_budget=tenant.cloud_budget,
            rate_limit_per_minute=tenant.rate_limit_per_minute,
            forced_tiers=frozenset(t for t in tenant.forced_tiers.split(",") if t),
            webhook_hosts=tenant.allowed_webhook_hosts,
        )

    def sees(self, tenant_id: uuid.UUID) -> bool:
        return self.is_admin or tenant_id == self.tenant_id


class KeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) > 10_000:  # bounded: forget everything rather than grow without limit
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + ttl, principal)


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, field="Authorization", headers={"WWW-Authenticate": 'Bearer realm="routet2i"'}
    )


def local_principal() -> Principal:
    """The admin of the ``local`` tenant, created on first use (authentication disabled)."""
    st = state()
    with st.sessions() as session:
        tenant = get_tenant_by_name(session, LOCAL_TENANT)
    if tenant is None:
        try:
            with transaction(st.sessions) as session:
                tenant = create_tenant(session, name=LOCAL_TENANT, is_admin=True)
        except sqlalchemy.exc.IntegrityError:  # another process created it first
            with st.sessions() as session:
                tenant = get_tenant_by_name(session, LOCAL_TENANT)
    assert tenant is not None
    return Principal.of(tenant)


def authenticate() -> None:
    """``before_request`` hook of the ``/v1`` blueprints: sets ``g.principal`` or answers 401."""
    st = state()
    if st.settings.auth == "disabled":
        if st.local_principal is None:
            st.local_principal = local_principal()
        g.principal = st.local_principal
        return
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(key.strip())
    principal = st.key_cache.get(digest)
    if principal is None:
        with st.sessions() as session:
            tenant = tenant_for_key(session, key.strip())
            if tenant is None:
                raise unauthorized("invalid or revoked API key")
            principal = Principal.of(tenant)
        st.key_cache.put(digest, principal, st.settings.auth_cache_s)
    g.principal = principal


def principal() -> Principal:
    return cast(Principal, g.principal)
