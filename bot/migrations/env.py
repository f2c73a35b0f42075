"""Alembic environment: migrates the connection `Store` hands over, never a URL of its own."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from bot.store import Base, schema_objects_of

# A PostgreSQL-wide lock key, so two processes starting at once do not migrate concurrently.
MIGRATION_LOCK_KEY = 7_316_605

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_object=schema_objects_of(connection.dialect.name),
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.run_migrations()
