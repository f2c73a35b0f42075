"""What every part of the store shares: the engine, its sessions, the schema's migration.

SQLite file by default (WAL), PostgreSQL by URL. The schema is created only by the Alembic
migrations in bot/migrations; opening a store upgrades to the newest one. Every method opens a
short session and returns frozen snapshots, so callers never hold a session or a lock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine, create_engine
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bot.store.sqlite import configure_sqlite

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"

NO_SUCH_RUN = "no run with id {run_id}"
NO_SUCH_PIPELINE = "no pipeline with id {pipeline_id}"
UNKNOWN_FIELDS = "{table} has no field(s) {names}; known fields: {known}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreBase:
    """The database connection every part of the store shares: one engine, a short session
    per call, so the store is thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect_name = parsed.get_backend_name()
        if self.dialect_name == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        if self.dialect_name == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(parsed, pool_pre_ping=self.dialect_name != "sqlite")
        if self.dialect_name == "sqlite":
            configure_sqlite(self.engine)
        # Writes on SQLite take the write lock up front (BEGIN IMMEDIATE): a deferred transaction
        # that reads, then writes can fail with SQLITE_BUSY instead of waiting its turn.
        self._write_engine = self.engine.execution_options(trimo_begin="IMMEDIATE")
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._insert = sqlite_dialect.insert if self.dialect_name == "sqlite" else postgresql.insert
        self.migrate()

    @property
    def key(self) -> str:
        """A short name for this database, the same in every process that opens it."""
        import hashlib

        rendered = make_url(self.url).render_as_string(hide_password=True)
        return hashlib.sha256(rendered.encode()).hexdigest()[:16]

    @staticmethod
    def sqlite_url(data_dir: Path) -> str:
        return f"sqlite:///{data_dir}/trimo.db"

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> None:
        """Raise when the database does not answer a trivial query."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when already there)."""
        from alembic import command

        with self._write_engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")

    def schema_version(self) -> str | None:
        from alembic.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writes() as session, session.begin():
            yield session


def alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def check_fields(table: str, fields: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(fields) - known
    if unknown:
        raise TypeError(
            UNKNOWN_FIELDS.format(
                table=table, names=", ".join(sorted(unknown)), known=", ".join(sorted(known))
            )
        )
