"""Run leases: a worker holds each run it executes until a time it keeps pushing forward.

`worker_id` stays the lease's owner; `lease_host` is the host it runs on (a dead lease on this
host is confirmed by the owner's pid), `lease_expires_at` when the lease ends unless renewed,
`engine_id` the Docker engine that runs the run's containers (only a worker that reaches it
removes them). The runner's heartbeat no longer judges liveness, so `heartbeat_at` goes; a run
live at the upgrade keeps the time the old rule would have judged it dead at (120 s after its
last heartbeat).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

UTC_TIME = sa.DateTime(timezone=True)
OLD_STALE_AFTER = timedelta(seconds=120)
FINISHED = ("succeeded", "failed", "error", "cancelled", "timed_out", "budget_exceeded", "rejected")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("lease_host", sa.String(255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("engine_id", sa.String(100), nullable=True))
    runs = sa.table(
        "runs",
        sa.column("id", sa.Integer()),
        sa.column("state", sa.String()),
        sa.column("heartbeat_at", UTC_TIME),
        sa.column("started_at", UTC_TIME),
        sa.column("lease_expires_at", UTC_TIME),
    )
    conn = op.get_bind()
    live = conn.execute(
        sa.select(runs.c.id, runs.c.heartbeat_at, runs.c.started_at).where(
            runs.c.state.not_in(FINISHED), runs.c.state != "queued"
        )
    ).all()
    for run_id, heartbeat_at, started_at in live:
        last = heartbeat_at or started_at
        if last is not None:
            conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id)
                .values(lease_expires_at=last + OLD_STALE_AFTER)
            )
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_at")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", UTC_TIME, nullable=True))
        batch.drop_column("engine_id")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_host")
