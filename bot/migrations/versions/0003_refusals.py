"""Refusals: when a sender was last told they may not command Trimo, per pipeline.

Below the minimum permission, a sender gets at most one refusal comment per pipeline per hour;
kept in the store so that a restart does not answer a flood again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("repo", sa.String(200), primary_key=True),
        sa.Column("pipeline_key", sa.String(200), primary_key=True),
        sa.Column("sender", sa.String(100), primary_key=True),
        sa.Column("refused_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("refusals")
