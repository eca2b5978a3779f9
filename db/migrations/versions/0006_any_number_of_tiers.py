"""any number of tiers: tier names of 32 characters, longer forced-tier lists, the tier a reservation pays for

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 00:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIER_COLUMNS = {  # table: {column: nullable}
    "jobs": {"requested_tier": True, "tier": True},
    "decisions": {"tier": False},
    "generations": {"tier": False},
    "cost_entries": {"tier": False},
}


def _resize(tier_length: int, forced_length: int) -> None:
    for table, columns in _TIER_COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, nullable in columns.items():
                batch_op.alter_column(column, type_=sa.String(length=tier_length), existing_nullable=nullable)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column("forced_tiers", type_=sa.String(length=forced_length), existing_nullable=False)


def upgrade() -> None:
    _resize(32, 400)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved_tier", sa.String(length=32), nullable=True))
    # Every reservation so far paid for a cloud image: the job's own on the cloud, its shadow's on the edge.
    op.execute("UPDATE jobs SET reserved_tier = 'cloud' WHERE reserved_usd > 0")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("reserved_tier")
    _resize(8, 32)
