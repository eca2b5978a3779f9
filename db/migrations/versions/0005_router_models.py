"""router models: the registry of trained routers, one champion per deployment router

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 22:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "router_models",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("slot", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("encoder", sa.String(length=128), nullable=True),
        sa.Column("artifact", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("trained_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trained_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("promoted_by", sa.String(length=128), nullable=True),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("router_models", schema=None) as batch_op:
        batch_op.create_index("ix_router_models_slot_created", ["slot", "created_at"], unique=False)
        batch_op.create_index(
            "uq_router_models_champion",
            ["slot"],
            unique=True,
            postgresql_where=sa.text("state = 'champion'"),
            sqlite_where=sa.text("state = 'champion'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("router_models", schema=None) as batch_op:
        batch_op.drop_index("uq_router_models_champion")
        batch_op.drop_index("ix_router_models_slot_created")
    op.drop_table("router_models")
