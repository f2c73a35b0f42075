"""The first schema: pipelines, runs, run events, deliveries, installations, posted objects.

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Event and delivery ids grow fastest; SQLite only autoincrements an INTEGER primary key.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("repo", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("branch", sa.String(255), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("installation_id", sa.BigInteger(), nullable=True),
        sa.Column("head_repo", sa.String(200), nullable=True),
        sa.Column("pr_number", sa.Integer(), nullable=True),
        sa.Column("approved_sha", sa.String(64), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.UniqueConstraint("repo", "key", name="uq_pipelines_repo_key"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "pipeline_id",
            sa.Integer(),
            sa.ForeignKey("pipelines.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(100), nullable=True),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=True),
        sa.Column("agent_command", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("container_id", sa.String(100), nullable=True),
        sa.Column("image_tag", sa.String(255), nullable=True),
        sa.Column("base_sha", sa.String(64), nullable=True),
        sa.Column("head_sha", sa.String(64), nullable=True),
        sa.Column("commits", sa.Integer(), nullable=True),
        sa.Column("tests_passed", sa.Integer(), nullable=True),
        sa.Column("tests_failed", sa.Integer(), nullable=True),
        sa.Column("tests_skipped", sa.Integer(), nullable=True),
        sa.Column("tests_errors", sa.Integer(), nullable=True),
        sa.Column("failures_json", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("report_json", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.Column("comment_id", sa.BigInteger(), nullable=True),
        sa.Column("check_run_id", sa.BigInteger(), nullable=True),
        sa.Column("pr_number", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("started_at", UTC_TIME, nullable=True),
        sa.Column("finished_at", UTC_TIME, nullable=True),
        sa.Column("heartbeat_at", UTC_TIME, nullable=True),
    )
    op.create_index("ix_runs_state", "runs", ["state"])
    op.create_index("ix_runs_pipeline_id", "runs", ["pipeline_id"])
    op.create_table(
        "run_events",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
    )
    op.create_index("ix_run_events_run_id_id", "run_events", ["run_id", "id"])
    op.create_table(
        "deliveries",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("delivery_id", sa.String(100), nullable=False, unique=True),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=True),
        sa.Column("intents", sa.Text(), nullable=False),
        sa.Column("received_at", UTC_TIME, nullable=False),
        sa.Column("taken_at", UTC_TIME, nullable=True),
        sa.Column("processed_at", UTC_TIME, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_deliveries_pending", "deliveries", ["processed_at", "id"])
    op.create_table(
        "installations",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("account", sa.String(100), nullable=False),
        sa.Column("all_repos", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
    )
    op.create_table(
        "installation_repos",
        sa.Column(
            "installation_id",
            sa.BigInteger(),
            sa.ForeignKey("installations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("repo", sa.String(200), primary_key=True),
    )
    op.create_table(
        "posted",
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("github_id", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "posted",
        "installation_repos",
        "installations",
        "deliveries",
        "run_events",
        "runs",
        "pipelines",
    ):
        op.drop_table(table)
