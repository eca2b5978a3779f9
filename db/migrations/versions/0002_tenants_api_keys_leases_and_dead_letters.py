"""tenants, api keys, leases and dead letters

Jobs existing before this revision are given to a tenant named ``legacy`` (an admin, so nothing becomes
invisible); idempotency keys become unique per tenant.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 00:02:40.699689
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("cloud_budget", sa.Float(), nullable=True),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True),
        sa.Column("forced_tiers", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant_id"), ["tenant_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=True))

    connection = op.get_bind()
    if connection.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar():
        legacy = uuid.uuid4()
        op.bulk_insert(
            tenants,
            [
                {
                    "id": legacy,
                    "name": "legacy",
                    "is_admin": True,
                    "cloud_budget": None,
                    "rate_limit_per_minute": None,
                    "forced_tiers": "",
                    "created_at": datetime.now(UTC),
                }
            ],
        )
        jobs = sa.table("jobs", sa.column("tenant_id", sa.Uuid()))
        connection.execute(jobs.update().values(tenant_id=legacy))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.alter_column("redeliveries", existing_type=sa.Integer(), server_default=None)
        batch_op.drop_constraint("uq_jobs_idempotency_key", type_="unique")
        batch_op.create_index("ix_jobs_dead_lettered", ["dead_lettered_at"], unique=False)
        batch_op.create_index("ix_jobs_tenant_created", ["tenant_id", "created_at"], unique=False)
        batch_op.create_unique_constraint("uq_jobs_tenant_idempotency_key", ["tenant_id", "idempotency_key"])
        batch_op.create_foreign_key("fk_jobs_tenant_id", "tenants", ["tenant_id"], ["id"], ondelete="RESTRICT")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_tenant_id", type_="foreignkey")
        batch_op.drop_constraint("uq_jobs_tenant_idempotency_key", type_="unique")
        batch_op.drop_index("ix_jobs_tenant_created")
        batch_op.drop_index("ix_jobs_dead_lettered")
        batch_op.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
        batch_op.drop_column("dead_lettered_at")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("enqueued_at")
        batch_op.drop_column("redeliveries")
        batch_op.drop_column("tenant_id")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant_id"))

    op.drop_table("api_keys")
    op.drop_table("tenants")
