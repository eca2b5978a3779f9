"""job cloud reservations

What a routed cloud job holds in the spend ledger, and in which period, so that a reservation whose image the
cloud generator refused can be given back (and taken again when the job is replayed). Jobs existing before
this revision hold nothing: their reservations stay counted, as they were.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 03:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved_usd", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("reserved_period", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("reserved_period")
        batch_op.drop_column("reserved_usd")
