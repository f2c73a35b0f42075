"""SQLite: deliveries lose the pending index; claims scan by id from the oldest pending one.

Every webhook request inserts a delivery, and each index on the table is one more page written
and checkpointed per request. On SQLite, ids commit in order, so `Store.claim_delivery` finds
pending deliveries by id without it. PostgreSQL keeps the index (ids can commit out of order).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_deliveries_pending", table_name="deliveries")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.create_index("ix_deliveries_pending", "deliveries", ["processed_at", "id"])
