"""The outbox of GitHub reports, and deliveries that are leased and retried.

Every write Trimo makes to GitHub is stored in `outbox` first and sent from there, so a crash,
a restart or GitHub's rate limits neither lose nor double a report. A delivery being processed
is held under a lease (owner and expiry, renewed while it is processed) instead of a taken time,
and a failed one is retried with backoff up to a limit (`attempts`, `next_attempt_at`);
`delivery_runs` keeps the run each delivery queued, so a retried one queues none again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("report_id", sa.String(200), nullable=False, unique=True),
        sa.Column("lane", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column(
            "run_id",
            sa.Integer(),
            sa.ForeignKey("runs.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("installation_id", sa.BigInteger(), nullable=False),
        sa.Column("repo", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("github_id", sa.BigInteger(), nullable=True),
        sa.Column("github_url", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC_TIME, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_until", UTC_TIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("sent_at", UTC_TIME, nullable=True),
    )
    op.create_index("ix_outbox_state_lane_seq", "outbox", ["state", "lane", "seq"])
    op.create_index("ix_outbox_run_id", "outbox", ["run_id"])
    op.create_table(
        "delivery_runs",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_until", UTC_TIME, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
        batch.drop_column("next_attempt_at")
        batch.drop_column("attempts")
    op.drop_table("delivery_runs")
    op.drop_index("ix_outbox_run_id", table_name="outbox")
    op.drop_index("ix_outbox_state_lane_seq", table_name="outbox")
    op.drop_table("outbox")
