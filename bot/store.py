"""The run store and queue: pipelines, runs, events, webhook deliveries, installations.

SQLite file by default (WAL), PostgreSQL by URL. The schema is created only by the Alembic
migrations in bot/migrations; opening a Store upgrades to the newest one. Every method opens a
short session and returns frozen snapshots, so callers never hold a session or a lock.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from bot.errors import NoSuchRunError, TrimoError
from bot.states import FINISHED, PipelineKind, RunMode, RunState

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A delivery taken by a process that died is handed out again after this long.
DELIVERY_RETAKE_AFTER = timedelta(minutes=10)
# The delivery writer's WAL checkpoints (see _Checkpointer): how often the thread looks, the
# WAL size (pages) from which it has the WAL restarted, the remainder small enough for the
# writer to finish, and the size at which SQLite checkpoints in the writer whatever happens.
CHECKPOINT_POLL_SECONDS = 0.05
CHECKPOINT_RESTART_PAGES = 1000
CHECKPOINT_REMAINDER_PAGES = 200
CHECKPOINT_BACKSTOP_PAGES = 20_000
# How long a fork waits for the checkpoint thread to finish its pass (one pass takes milliseconds).
CHECKPOINT_JOIN_SECONDS = 30
# How long a processed delivery's id is kept to recognise a redelivery: GitHub redelivers
# (automatically or when asked) within 3 days.
DELIVERY_KEEP = timedelta(days=7)

NO_SUCH_RUN = "no run with id {run_id}"
NO_SUCH_PIPELINE = "no pipeline with id {pipeline_id}"
UNKNOWN_FIELDS = "{table} has no field(s) {names}; known fields: {known}"
BATCH_FAILED = "delivery {delivery_id} was not recorded: committing its batch failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, whatever the database keeps (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class PipelineRecord(Base):
    __tablename__ = "pipelines"
    __table_args__ = (UniqueConstraint("repo", "key", name="uq_pipelines_repo_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    branch: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(Text, default="")
    number: Mapped[int | None] = mapped_column(Integer)
    installation_id: Mapped[int | None] = mapped_column(BigInteger)
    head_repo: Mapped[str | None] = mapped_column(String(200))
    pr_number: Mapped[int | None] = mapped_column(Integer)
    approved_sha: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RunRecord(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_state", "state"),
        Index("ix_runs_pipeline_id", "pipeline_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str | None] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(Text, default="")
    instructions: Mapped[str | None] = mapped_column(Text)
    agent_command: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    container_id: Mapped[str | None] = mapped_column(String(100))
    image_tag: Mapped[str | None] = mapped_column(String(255))
    base_sha: Mapped[str | None] = mapped_column(String(64))
    head_sha: Mapped[str | None] = mapped_column(String(64))
    commits: Mapped[int | None] = mapped_column(Integer)
    tests_passed: Mapped[int | None] = mapped_column(Integer)
    tests_failed: Mapped[int | None] = mapped_column(Integer)
    tests_skipped: Mapped[int | None] = mapped_column(Integer)
    tests_errors: Mapped[int | None] = mapped_column(Integer)
    failures_json: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    report_json: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    comment_id: Mapped[int | None] = mapped_column(BigInteger)
    check_run_id: Mapped[int | None] = mapped_column(BigInteger)
    pr_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EventRecord(Base):
    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryRecord(Base):
    __tablename__ = "deliveries"
    # PostgreSQL finds pending deliveries by this index. SQLite has none: one index fewer is one
    # page fewer written by every webhook request, and there ids commit in order, so the claim
    # scans by id from the oldest delivery not yet processed (`Store._pending_from`).
    __table_args__ = (
        Index("ix_deliveries_pending", "processed_at", "id").ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(100), unique=True)
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64))
    intents: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)


class InstallationRecord(Base):
    __tablename__ = "installations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account: Mapped[str] = mapped_column(String(100))
    all_repos: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class InstallationRepoRecord(Base):
    __tablename__ = "installation_repos"

    installation_id: Mapped[int] = mapped_column(
        ForeignKey("installations.id", ondelete="CASCADE"), primary_key=True
    )
    repo: Mapped[str] = mapped_column(String(200), primary_key=True)


class PostedRecord(Base):
    __tablename__ = "posted"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    github_id: Mapped[int] = mapped_column(BigInteger)


class RefusalRecord(Base):
    """When a sender was last told, on one pipeline, that they may not command Trimo."""

    __tablename__ = "refusals"

    repo: Mapped[str] = mapped_column(String(200), primary_key=True)
    pipeline_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    sender: Mapped[str] = mapped_column(String(100), primary_key=True)
    refused_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class Pipeline:
    """One branch: an issue's, a pull request's, or a local repository's."""

    id: int
    repo: str
    key: str
    kind: PipelineKind
    branch: str
    title: str
    number: int | None
    installation_id: int | None
    head_repo: str | None
    pr_number: int | None
    approved_sha: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Run:
    """One attempt on a pipeline, as stored when it was read."""

    id: int
    pipeline_id: int
    state: RunState
    mode: RunMode
    trigger: str
    sender: str | None
    task: str
    instructions: str | None
    agent_command: str | None
    worker_id: str | None
    container_id: str | None
    image_tag: str | None
    base_sha: str | None
    head_sha: str | None
    commits: int | None
    tests_passed: int | None
    tests_failed: int | None
    tests_skipped: int | None
    tests_errors: int | None
    failures: list[dict[str, Any]]
    summary: str | None
    report: dict[str, Any] | None
    reason: str | None
    error: str | None
    cancel_requested: bool
    cancel_reason: str | None
    superseded_by: int | None
    comment_id: int | None
    check_run_id: int | None
    pr_number: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def tests_exit_code(self) -> int | None:
        """The test command's exit code when a test phase ran (its report may be missing)."""
        tests = (self.report or {}).get("tests")
        code = tests.get("exit_code") if isinstance(tests, dict) else None
        return code if isinstance(code, int) else None

    @property
    def usage(self) -> dict[str, Any] | None:
        """Model usage as the run's gateway metered it: tokens in and out, dollars, calls."""
        usage = (self.report or {}).get("usage")
        return usage if isinstance(usage, dict) else None


@dataclass(frozen=True)
class RunEventRow:
    id: int
    run_id: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery waiting to be acted on; `intents` is the parsed JSON array."""

    delivery_id: str
    event: str
    action: str | None
    intents: list[Any]
    received_at: datetime
    previous_error: str | None = None  # set when an earlier attempt failed


@dataclass(frozen=True)
class Installation:
    id: int
    account: str
    repos: list[str] | None  # None: every repository of the account


_RUN_FIELDS = {c.key for c in RunRecord.__table__.columns} - {"id", "pipeline_id", "created_at"}
_PIPELINE_FIELDS = {c.key for c in PipelineRecord.__table__.columns} - {
    "id",
    "repo",
    "key",
    "created_at",
    "updated_at",
}


class Store:
    """The database behind Trimo; thread-safe (one engine, a short session per call)."""

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
            _configure_sqlite(self.engine)
        # Writes on SQLite take the write lock up front (BEGIN IMMEDIATE): a deferred transaction
        # that reads, then writes can fail with SQLITE_BUSY instead of waiting its turn.
        self._write_engine = self.engine.execution_options(trimo_begin="IMMEDIATE")
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._insert = sqlite.insert if self.dialect_name == "sqlite" else postgresql.insert
        # Every delivery with a smaller id is processed (see `_advance_pending_from`).
        self._pending_from = 0
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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when already there)."""
        from alembic import command

        with self._write_engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")

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

    # -- pipelines ------------------------------------------------------------------------------

    def get_or_create_pipeline(
        self,
        *,
        repo: str,
        key: str,
        kind: PipelineKind,
        branch: str,
        title: str,
        number: int | None = None,
        installation_id: int | None = None,
        head_repo: str | None = None,
    ) -> Pipeline:
        """The pipeline for (repo, key); created on first use, its title kept current after."""
        now = utcnow()
        values = {
            "repo": repo,
            "key": key,
            "kind": str(kind),
            "branch": branch,
            "title": title,
            "number": number,
            "installation_id": installation_id,
            "head_repo": head_repo,
            "created_at": now,
            "updated_at": now,
        }
        # The branch is fixed at creation: renaming it would orphan the pushed work.
        refresh = {"title": title, "updated_at": now}
        if installation_id is not None:
            refresh["installation_id"] = installation_id
        stmt = (
            self._insert(PipelineRecord)
            .values(values)
            .on_conflict_do_update(index_elements=["repo", "key"], set_=refresh)
            .returning(PipelineRecord.id)
        )
        with self._write() as s:
            pipeline_id = s.execute(stmt).scalar_one()
            return _pipeline(s.get_one(PipelineRecord, pipeline_id))

    def get_pipeline(self, pipeline_id: int) -> Pipeline:
        with self._read() as s:
            row = s.get(PipelineRecord, pipeline_id)
            if row is None:
                raise TrimoError(NO_SUCH_PIPELINE.format(pipeline_id=pipeline_id))
            return _pipeline(row)

    def find_pipeline(self, repo: str, key: str) -> Pipeline | None:
        with self._read() as s:
            row = s.scalars(
                select(PipelineRecord).where(PipelineRecord.repo == repo, PipelineRecord.key == key)
            ).one_or_none()
            return _pipeline(row) if row else None

    def list_pipelines(self, repo: str | None = None) -> list[Pipeline]:
        with self._read() as s:
            stmt = select(PipelineRecord).order_by(PipelineRecord.id)
            if repo is not None:
                stmt = stmt.where(PipelineRecord.repo == repo)
            return [_pipeline(r) for r in s.scalars(stmt)]

    def update_pipeline(self, pipeline_id: int, **fields: Any) -> None:
        _check_fields("pipelines", fields, _PIPELINE_FIELDS)
        fields["updated_at"] = utcnow()
        with self._write() as s:
            s.execute(update(PipelineRecord).where(PipelineRecord.id == pipeline_id).values(fields))

    # -- runs -----------------------------------------------------------------------------------

    def create_run(
        self,
        pipeline_id: int,
        *,
        trigger: str,
        task: str,
        mode: RunMode = RunMode.AGENT,
        sender: str | None = None,
        instructions: str | None = None,
        agent_command: str | None = None,
        head_sha: str | None = None,
    ) -> Run:
        """A new queued run; it appears in the queue when this returns."""
        row = RunRecord(
            pipeline_id=pipeline_id,
            state=str(RunState.QUEUED),
            mode=str(mode),
            trigger=trigger,
            sender=sender,
            task=task,
            instructions=instructions,
            agent_command=agent_command,
            head_sha=head_sha,
            cancel_requested=False,
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(row)
            s.flush()
            s.add(_event_row(row.id, "state", str(RunState.QUEUED), {"trigger": trigger}))
            return _run(row)

    def claim_run(self, worker_id: str, run_id: int | None = None) -> Run | None:
        """Move the oldest queued run (or run `run_id`) to preparing for this worker.

        Atomic: of several concurrent claimers exactly one gets a given run; None when nothing
        (or not that run) is queued.
        """
        now = utcnow()
        for _ in range(5):
            with self._write() as s:
                if run_id is None:
                    candidate = (
                        select(RunRecord.id)
                        .where(RunRecord.state == str(RunState.QUEUED))
                        .order_by(RunRecord.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                    target = s.execute(candidate).scalar_one_or_none()
                    if target is None:
                        return None
                else:
                    target = run_id
                result = s.execute(
                    update(RunRecord)
                    .where(RunRecord.id == target, RunRecord.state == str(RunState.QUEUED))
                    .values(
                        state=str(RunState.PREPARING),
                        worker_id=worker_id,
                        started_at=now,
                        heartbeat_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    s.add(
                        _event_row(target, "state", str(RunState.PREPARING), {"worker": worker_id})
                    )
                    row = s.get_one(RunRecord, target, populate_existing=True)
                    return _run(row)
                if run_id is not None:
                    return None
            # Another claimer took our candidate between the select and the update; try the next.
        return None

    def get_run(self, run_id: int) -> Run:
        with self._read() as s:
            row = s.get(RunRecord, run_id)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return _run(row)

    def list_runs(
        self,
        limit: int = 20,
        pipeline_id: int | None = None,
        *,
        repo: str | None = None,
        states: Iterable[RunState] | None = None,
        before_id: int | None = None,
    ) -> list[Run]:
        """Newest first; `before_id` pages back from a run id (exclusive)."""
        stmt = select(RunRecord).order_by(RunRecord.id.desc()).limit(limit)
        if pipeline_id is not None:
            stmt = stmt.where(RunRecord.pipeline_id == pipeline_id)
        if repo is not None:
            repo_pipelines = select(PipelineRecord.id).where(PipelineRecord.repo == repo)
            stmt = stmt.where(RunRecord.pipeline_id.in_(repo_pipelines))
        if states is not None:
            stmt = stmt.where(RunRecord.state.in_([str(x) for x in states]))
        if before_id is not None:
            stmt = stmt.where(RunRecord.id < before_id)
        with self._read() as s:
            return [_run(r) for r in s.scalars(stmt)]

    def run_counts(self) -> dict[tuple[str, str], int]:
        """How many runs each repository has in each state: {(repo, state): count}."""
        stmt = (
            select(PipelineRecord.repo, RunRecord.state, func.count())
            .join(PipelineRecord, PipelineRecord.id == RunRecord.pipeline_id)
            .group_by(PipelineRecord.repo, RunRecord.state)
        )
        with self._read() as s:
            return {(repo, state): int(n) for repo, state, n in s.execute(stmt)}

    def live_runs(self, pipeline_id: int | None = None) -> list[Run]:
        """Runs not yet finished, oldest first."""
        stmt = (
            select(RunRecord)
            .where(RunRecord.state.not_in([str(x) for x in FINISHED]))
            .order_by(RunRecord.id)
        )
        if pipeline_id is not None:
            stmt = stmt.where(RunRecord.pipeline_id == pipeline_id)
        with self._read() as s:
            return [_run(r) for r in s.scalars(stmt)]

    def stale_runs(self, older_than: timedelta) -> list[Run]:
        """Runs owned by a worker whose last heartbeat is older than `older_than` (dead worker)."""
        cutoff = utcnow() - older_than
        stmt = (
            select(RunRecord)
            .where(
                RunRecord.state.not_in([str(x) for x in FINISHED | {RunState.QUEUED}]),
                RunRecord.heartbeat_at < cutoff,
            )
            .order_by(RunRecord.id)
        )
        with self._read() as s:
            return [_run(r) for r in s.scalars(stmt)]

    def queued_count(self) -> int:
        with self._read() as s:
            stmt = select(func.count()).where(RunRecord.state == str(RunState.QUEUED))
            return int(s.execute(stmt).scalar_one())

    def set_state(
        self, run_id: int, state: RunState, *, reason: str | None = None, **fields: Any
    ) -> Run:
        """Move a run to `state` (with optional other fields) and record a "state" event.

        A finished run stays as it is (the first final state wins, e.g. cancel vs. success);
        the returned snapshot shows which state the run is really in.
        """
        values = _run_values(fields)
        values["state"] = str(state)
        if reason is not None:
            values["reason"] = reason
        if state in FINISHED:
            values.setdefault("finished_at", utcnow())
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state.not_in([str(x) for x in FINISHED]))
                .values(values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                data = {"reason": reason} if reason else None
                s.add(_event_row(run_id, "state", str(state), data))
            row = s.get(RunRecord, run_id, populate_existing=True)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return _run(row)

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set free fields; `failures` (list of dicts) and `report` (dict) are stored as JSON."""
        values = _run_values(fields)
        if not values:
            return
        with self._write() as s:
            result = s.execute(update(RunRecord).where(RunRecord.id == run_id).values(values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))

    def merge_report(self, run_id: int, **parts: Any) -> None:
        """Set keys of the run's report (e.g. `usage`, `commits`), keeping the others."""
        with self._write() as s:
            row = s.get(RunRecord, run_id)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            report = json.loads(row.report_json) if row.report_json else {}
            report.update(parts)
            row.report_json = json.dumps(report)

    def model_usd_since(self, installation_id: int | None, since: datetime) -> float:
        """Dollars spent on model calls by the runs of one installation (None: local runs) since
        `since`, as their gateways metered them."""
        installation = (
            PipelineRecord.installation_id.is_(None)
            if installation_id is None
            else PipelineRecord.installation_id == installation_id
        )
        stmt = (
            select(RunRecord.report_json)
            .join(PipelineRecord, PipelineRecord.id == RunRecord.pipeline_id)
            .where(installation, RunRecord.created_at >= since, RunRecord.report_json.is_not(None))
        )
        total = 0.0
        with self._read() as s:
            for (raw,) in s.execute(stmt):
                usage = (json.loads(raw or "{}") or {}).get("usage") or {}
                total += float(usage.get("usd") or 0.0)
        return total

    def request_cancel(self, run_id: int, reason: str) -> bool:
        """Ask the run's worker to stop it; False when the run has already finished."""
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state.not_in([str(x) for x in FINISHED]))
                .values(cancel_requested=True, cancel_reason=reason)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                s.add(_event_row(run_id, "event", "cancel requested", {"reason": reason}))
                return True
            if s.get(RunRecord, run_id) is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return False

    def heartbeat(self, run_id: int) -> None:
        with self._write() as s:
            s.execute(update(RunRecord).where(RunRecord.id == run_id).values(heartbeat_at=utcnow()))

    # -- events and logs ------------------------------------------------------------------------

    def add_event(
        self, run_id: int, kind: str, message: str = "", data: Mapping[str, Any] | None = None
    ) -> None:
        with self._write() as s:
            s.execute(insert(EventRecord).values(_event_values(run_id, kind, message, data)))

    def add_logs(self, run_id: int, lines: list[str]) -> None:
        """Many log lines in one transaction, kept in the given order."""
        if not lines:
            return
        rows = [_event_values(run_id, "log", line, None) for line in lines]
        with self._write() as s:
            s.execute(insert(EventRecord), rows)

    def events(
        self,
        run_id: int,
        after_id: int = 0,
        kinds: Iterable[str] | None = None,
        limit: int | None = None,
        *,
        without: Iterable[str] | None = None,
    ) -> list[RunEventRow]:
        """Events of a run with id > after_id, in the order they were added; `kinds` keeps
        only those kinds, `without` leaves those out."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.run_id == run_id, EventRecord.id > after_id)
            .order_by(EventRecord.id)
        )
        if kinds is not None:
            stmt = stmt.where(EventRecord.kind.in_(list(kinds)))
        if without is not None:
            stmt = stmt.where(EventRecord.kind.not_in(list(without)))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as s:
            return [_event(r) for r in s.scalars(stmt)]

    def log_tail(self, run_id: int, limit: int) -> tuple[list[RunEventRow], int]:
        """The last `limit` log lines of a run, oldest first, and how many lines it has."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.run_id == run_id, EventRecord.kind == "log")
            .order_by(EventRecord.id.desc())
            .limit(limit)
        )
        count = select(func.count()).where(EventRecord.run_id == run_id, EventRecord.kind == "log")
        with self._read() as s:
            rows = [_event(r) for r in s.scalars(stmt)]
            total = int(s.execute(count).scalar_one())
        rows.reverse()
        return rows, total

    def events_since(self, after_id: int, kinds: Iterable[str], limit: int) -> list[RunEventRow]:
        """Events of every run with id > after_id and one of `kinds`, oldest first."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.id > after_id, EventRecord.kind.in_(list(kinds)))
            .order_by(EventRecord.id)
            .limit(limit)
        )
        with self._read() as s:
            return [_event(r) for r in s.scalars(stmt)]

    def last_event_id(self) -> int:
        """The newest event id of any run (0 when there is none)."""
        with self._read() as s:
            return int(s.execute(select(func.max(EventRecord.id))).scalar_one() or 0)

    # -- webhook deliveries ---------------------------------------------------------------------

    def record_delivery(
        self, delivery_id: str, event: str, action: str | None, intents: str
    ) -> bool:
        """Store a delivery and what it asks for; False when this delivery id was seen before.

        Runs inside the webhook request, so it is one prepared INSERT ... ON CONFLICT DO NOTHING
        on a raw connection of this thread, committed before it returns. A delivery with no
        intents is kept for deduplication but is already processed.
        """
        writer = self.__dict__.get("_delivery_writer")
        if writer is None:
            with _DELIVERY_WRITER_LOCK:
                writer = self.__dict__.get("_delivery_writer")
                if writer is None:
                    writer = self._delivery_writer = _DeliveryWriter(self.engine)
        now = utcnow()
        return writer.record(
            delivery_id, event, action, intents, now, now if intents.strip() == "[]" else None
        )

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections (never use or close them)."""
        writer = self.__dict__.get("_delivery_writer")
        if writer is not None:
            writer.forget()
        # close=False: the parent still owns those connections; only forget them here.
        self.engine.dispose(close=False)

    def ping(self) -> None:
        """Raise when the database does not answer a trivial query."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def claim_delivery(self) -> Delivery | None:
        """The oldest delivery not yet processed, marked taken so no one else gets it."""
        now = utcnow()
        retake = now - DELIVERY_RETAKE_AFTER
        for _ in range(5):
            with self._write() as s:
                start = self._advance_pending_from(s)
                target = s.execute(
                    select(DeliveryRecord.id)
                    .where(
                        DeliveryRecord.id >= start,
                        DeliveryRecord.processed_at.is_(None),
                        (DeliveryRecord.taken_at.is_(None)) | (DeliveryRecord.taken_at < retake),
                    )
                    .order_by(DeliveryRecord.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar_one_or_none()
                if target is None:
                    return None
                result = s.execute(
                    update(DeliveryRecord)
                    .where(
                        DeliveryRecord.id == target,
                        DeliveryRecord.processed_at.is_(None),
                        (DeliveryRecord.taken_at.is_(None)) | (DeliveryRecord.taken_at < retake),
                    )
                    .values(taken_at=now)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    row = s.get_one(DeliveryRecord, target, populate_existing=True)
                    return Delivery(
                        delivery_id=row.delivery_id,
                        event=row.event,
                        action=row.action,
                        intents=json.loads(row.intents),
                        received_at=row.received_at,
                        previous_error=row.error,
                    )
        return None

    def _advance_pending_from(self, s: Session) -> int:
        """The smallest id a delivery not yet processed can have; called in a write transaction.

        On SQLite, writers take turns, so ids commit in increasing order: once every delivery
        below an id is processed, none can appear there later, and the claim need not scan
        them again. The first claim in a process scans from the start once. On PostgreSQL, ids
        from a sequence can commit out of order, so it stays 0 and the pending index serves.
        """
        if self.dialect_name != "sqlite":
            return 0
        start = self._pending_from
        first = s.execute(
            select(DeliveryRecord.id)
            .where(DeliveryRecord.id >= start, DeliveryRecord.processed_at.is_(None))
            .order_by(DeliveryRecord.id)
            .limit(1)
        ).scalar_one_or_none()
        if first is None:
            newest = s.execute(select(func.max(DeliveryRecord.id))).scalar_one_or_none()
            first = start if newest is None else max(start, newest + 1)
        # Assigned inside the write transaction, so later claims only ever see it grow.
        self._pending_from = first
        return first

    def finish_delivery(self, delivery_id: str, error: str | None = None) -> None:
        with self._write() as s:
            s.execute(
                update(DeliveryRecord)
                .where(DeliveryRecord.delivery_id == delivery_id)
                .values(processed_at=utcnow(), error=error)
            )

    def prune_deliveries(self, older_than: timedelta = DELIVERY_KEEP) -> int:
        """Forget deliveries processed longer ago than `older_than`; returns how many.

        A delivery id is kept as long as GitHub may redeliver it; after that, the row is only
        weight. The newest row always stays: SQLite numbers the next row after the largest id
        there, and claims rely on ids only ever growing.
        """
        cutoff = utcnow() - older_than
        newest = select(func.max(DeliveryRecord.id)).scalar_subquery()
        with self._write() as s:
            result = s.execute(
                delete(DeliveryRecord).where(
                    DeliveryRecord.processed_at < cutoff, DeliveryRecord.id < newest
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def pending_deliveries(self) -> int:
        with self._read() as s:
            stmt = select(func.count()).where(
                DeliveryRecord.id >= self._pending_from, DeliveryRecord.processed_at.is_(None)
            )
            return int(s.execute(stmt).scalar_one())

    # -- installations --------------------------------------------------------------------------

    def upsert_installation(
        self, installation_id: int, account: str, repos: list[str] | None
    ) -> None:
        """Record an installation; `repos` None means all of the account's repositories,
        a list replaces the selected repositories."""
        now = utcnow()
        stmt = (
            self._insert(InstallationRecord)
            .values(id=installation_id, account=account, all_repos=repos is None, updated_at=now)
            .on_conflict_do_update(
                index_elements=["id"],
                set_={"account": account, "all_repos": repos is None, "updated_at": now},
            )
        )
        with self._write() as s:
            s.execute(stmt)
            s.execute(
                delete(InstallationRepoRecord).where(
                    InstallationRepoRecord.installation_id == installation_id
                )
            )
            if repos:
                s.execute(
                    insert(InstallationRepoRecord),
                    [{"installation_id": installation_id, "repo": r} for r in set(repos)],
                )

    def delete_installation(self, installation_id: int) -> None:
        """Forget an installation and its repositories; an unknown one is no error."""
        with self._write() as s:
            s.execute(
                delete(InstallationRepoRecord).where(
                    InstallationRepoRecord.installation_id == installation_id
                )
            )
            s.execute(delete(InstallationRecord).where(InstallationRecord.id == installation_id))

    def add_installation_repos(
        self, installation_id: int, repos: list[str], *, account: str
    ) -> None:
        """Add repositories to an installation, recording the installation (of `account`, its
        repositories selected) if Trimo has not seen it: GitHub's events come in any order, and
        an App installed before Trimo first started was never `created` here."""
        known = (
            self._insert(InstallationRecord)
            .values(id=installation_id, account=account, all_repos=False, updated_at=utcnow())
            .on_conflict_do_nothing()
        )
        with self._write() as s:
            s.execute(known)
            if repos:
                s.execute(
                    self._insert(InstallationRepoRecord)
                    .values([{"installation_id": installation_id, "repo": r} for r in set(repos)])
                    .on_conflict_do_nothing()
                )

    def remove_installation_repos(self, installation_id: int, repos: list[str]) -> None:
        """Forget repositories of an installation; what Trimo does not know is left as it is."""
        with self._write() as s:
            s.execute(
                delete(InstallationRepoRecord).where(
                    InstallationRepoRecord.installation_id == installation_id,
                    InstallationRepoRecord.repo.in_(repos),
                )
            )

    def run_for_posted(self, kind: str, github_id: int) -> int | None:
        """The run that posted GitHub object `github_id` (e.g. a check run), if any."""
        with self._read() as s:
            row = s.execute(
                select(PostedRecord.run_id).where(
                    PostedRecord.kind == kind, PostedRecord.github_id == github_id
                )
            ).first()
            return int(row[0]) if row else None

    def get_installation(self, installation_id: int) -> Installation | None:
        with self._read() as s:
            row = s.get(InstallationRecord, installation_id)
            if row is None:
                return None
            return _installation(s, row)

    def installation_for_repo(self, repo: str) -> int | None:
        """The id of the installation that covers `repo` ("owner/name"), if any."""
        owner = repo.split("/", 1)[0]
        with self._read() as s:
            listed = s.execute(
                select(InstallationRepoRecord.installation_id).where(
                    InstallationRepoRecord.repo == repo
                )
            ).scalar()
            if listed is not None:
                return int(listed)
            everything = s.execute(
                select(InstallationRecord.id).where(
                    InstallationRecord.all_repos.is_(True),
                    func.lower(InstallationRecord.account) == owner.lower(),
                )
            ).scalar()
            return int(everything) if everything is not None else None

    # -- refusals -------------------------------------------------------------------------------

    def take_refusal(self, repo: str, pipeline_key: str, sender: str, every: timedelta) -> bool:
        """Whether `sender` may be told of a refusal on the pipeline now (at most once `every`);
        when True, the refusal is recorded as told, so a restart does not tell it again."""
        now = utcnow()
        stmt = (
            self._insert(RefusalRecord)
            .values(repo=repo, pipeline_key=pipeline_key, sender=sender, refused_at=now)
            .on_conflict_do_update(
                index_elements=["repo", "pipeline_key", "sender"],
                set_={"refused_at": now},
                where=RefusalRecord.refused_at < now - every,
            )
        )
        with self._write() as s:
            result = s.execute(stmt)
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    # -- posted GitHub objects ------------------------------------------------------------------

    def remember(self, run_id: int, kind: str, github_id: int) -> None:
        """Record the id of something posted for this run (kind: "comment", "check_run", ...)."""
        stmt = (
            self._insert(PostedRecord)
            .values(run_id=run_id, kind=kind, github_id=github_id)
            .on_conflict_do_update(index_elements=["run_id", "kind"], set_={"github_id": github_id})
        )
        with self._write() as s:
            s.execute(stmt)

    def recall(self, run_id: int, kind: str) -> int | None:
        with self._read() as s:
            row = s.get(PostedRecord, (run_id, kind))
            return row.github_id if row else None


_DELIVERY_WRITER_LOCK = threading.Lock()
_RECORD_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, event, action, intents, received_at, processed_at) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT (delivery_id) DO NOTHING"
)


def schema_objects_of(dialect_name: str) -> Callable[..., bool]:
    """Alembic's `include_object` for one dialect: skips what the models make only for another.

    Alembic's comparison ignores `ddl_if`, so without it the SQLite schema would seem to lack
    the PostgreSQL-only `ix_deliveries_pending`.
    """

    def include(obj: Any, _name: Any, _type: Any, _reflected: Any, _compare_to: Any) -> bool:
        only = getattr(obj, "_ddl_if", None)
        if only is None or only.dialect is None:
            return True
        dialects = (only.dialect,) if isinstance(only.dialect, str) else tuple(only.dialect)
        return dialect_name in dialects

    return include


def _sqlite_datetime(value: datetime) -> str:
    """A UTC time as SQLAlchemy's DateTime keeps it in SQLite ("%Y-%m-%d %H:%M:%S.%f", no zone:
    UTCDateTime drops it there); isoformat writes it in half the time of strftime."""
    return value.isoformat(" ", "microseconds")[:26]


class _PendingDelivery:
    """One `record_delivery` call waiting for the commit of its batch."""

    __slots__ = ("done", "error", "fresh", "params", "wake")

    def __init__(self, params: tuple[Any, ...]) -> None:
        self.params = params
        self.done = False
        self.fresh = False
        self.error: BaseException | None = None
        # Held from the start: the waiting thread blocks on it until a leader releases it.
        self.wake = threading.Lock()
        self.wake.acquire()


class _DeliveryWriter:
    """`Store.record_delivery`'s writes: one raw DBAPI connection per process, group commit.

    SQLAlchemy's statement building and session cost ten times the INSERT itself, and this runs
    once per webhook request; so the INSERT is a fixed, prepared statement on a raw connection
    (the driver's statement cache on SQLite, a server-side prepared statement on PostgreSQL).

    Concurrent callers share commits: the first caller becomes the leader, takes every
    delivery waiting at that moment, INSERTs them in one transaction and commits; the others
    wait until the commit of the batch holding theirs, then return. So a caller returns only
    once its row is committed, and one commit (one WAL append, or one PostgreSQL flush) serves
    many requests. A lone caller commits alone, with no hand-off to another thread.

    The connection belongs to the process that opened it: a forked child forgets the inherited
    one (SQLite connections must not cross fork) and opens its own. It closes with the engine.
    No fork happens while this process's SQLite is in use by the writer or its checkpoint thread:
    see `_before_fork`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sql = _RECORD_DELIVERY.format(p="?" if self.sqlite else "%s")
        self.connect_args = engine.dialect.create_connect_args(engine.url)
        self.forget()
        _DELIVERY_WRITERS.add(self)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    def forget(self) -> None:
        """Start afresh without touching the connection (after fork it is the parent's)."""
        self.mutex = threading.Lock()
        # Held while a batch is written; a fork takes it so that no write is under way then.
        self.writing = threading.Lock()
        self.pending: list[_PendingDelivery] = []
        self.leading = False
        self.conn: Any = None
        # The parent's checkpoint thread does not exist in a forked child.
        self.checkpointer: _Checkpointer | None = None

    def close(self) -> None:
        with self.mutex:
            conn, self.conn = self.conn, None
            checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            checkpointer.close()
        if conn is not None:
            conn.close()

    def record(
        self,
        delivery_id: str,
        event: str,
        action: str | None,
        intents: str,
        received_at: datetime,
        processed_at: datetime | None,
    ) -> bool:
        if self.sqlite:
            stamps: tuple[Any, Any] = (
                _sqlite_datetime(received_at),
                processed_at and _sqlite_datetime(processed_at),
            )
        else:
            stamps = (received_at, processed_at)
        mine = _PendingDelivery((delivery_id, event, action, intents, *stamps))
        with self.mutex:
            self.pending.append(mine)
            lead = not self.leading
            self.leading = True
        if not lead:
            # Woken when a leader has committed our batch, or when we are the next leader.
            mine.wake.acquire()
        if not mine.done:
            self._lead()
            if mine.error is not None:
                raise mine.error
        elif mine.error is not None:
            raise TrimoError(BATCH_FAILED.format(delivery_id=delivery_id)) from mine.error
        return mine.fresh

    def _lead(self) -> None:
        with self.mutex:
            batch, self.pending = self.pending, []
        try:
            with self.writing:
                self._write(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            # Even on KeyboardInterrupt the batch's callers must be woken, or they wait forever.
            for entry in batch:
                entry.error = exc
        with self.mutex:
            following = self.pending[0] if self.pending else None
            self.leading = following is not None
        for entry in batch:
            entry.done = True
            entry.wake.release()
        if following is not None:
            # Leadership passes on: that caller commits whatever has gathered meanwhile.
            following.wake.release()

    def _write(self, batch: list[_PendingDelivery]) -> None:
        conn = self.conn or self._connect()
        checkpointer = self.checkpointer
        if checkpointer is not None:
            checkpointer.writes += 1
            if checkpointer.remainder_left:
                checkpointer.finish(conn)
        try:
            if len(batch) == 1:  # autocommit: the INSERT is its own transaction
                batch[0].fresh = self._insert(conn, batch[0].params)
            elif self.sqlite:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for entry in batch:
                        entry.fresh = self._insert(conn, entry.params)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            else:
                with conn.transaction():
                    for entry in batch:
                        entry.fresh = self._insert(conn, entry.params)
        except BaseException:
            for entry in batch:
                entry.fresh = False
            if not self.sqlite:
                # A broken PostgreSQL connection is replaced on the next call.
                self._drop(conn)
            raise

    def _insert(self, conn: Any, params: tuple[Any, ...]) -> bool:
        if self.sqlite:
            return bool(conn.execute(self.sql, params).rowcount == 1)
        return bool(conn.execute(self.sql, params, prepare=True).rowcount == 1)

    def _connect(self) -> Any:
        cargs, cparams = self.connect_args
        if self.sqlite:
            conn = sqlite3.connect(
                str(cargs[0]), isolation_level=None, check_same_thread=False, cached_statements=16
            )
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints are the checkpoint thread's; SQLite's own stays only as a bound.
            conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_BACKSTOP_PAGES}")
            self.checkpointer = _Checkpointer(str(cargs[0]))
            # A store dropped without close() must not leave its thread behind.
            weakref.finalize(self, self.checkpointer.stop)
        else:
            conn = self.engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
            conn.autocommit = True
        self.conn = conn
        return conn

    def _drop(self, conn: Any) -> None:
        self.conn = None
        # The error that got us here is the one to report, not a failure to close.
        with suppress(Exception):
            conn.close()


class _Checkpointer:
    """Copies the delivery writer's WAL into the database file from a thread of its own.

    SQLite checkpoints in the connection that commits, once the WAL holds 1000 pages: there,
    every few hundred webhook requests one waited for the copy and two fsyncs (3-13 ms, longer
    as the database grows), about a third of the request thread's time under load. Here a
    thread runs PASSIVE checkpoints, which never block a writer, on a connection of its own
    (sqlite3 releases the GIL meanwhile).

    A WAL only starts over from its beginning when a writer finds every frame copied, which a
    thread copying behind a busy writer never achieves: the WAL would grow without end. So once
    the WAL is past CHECKPOINT_RESTART_PAGES, the thread copies again until what one pass found
    new is at most CHECKPOINT_REMAINDER_PAGES, and then leaves that remainder to the writer
    (`finish`, before its next write): a short wait, and the WAL starts over. SQLite's own
    checkpoint stays enabled at CHECKPOINT_BACKSTOP_PAGES, so the WAL is bounded whatever
    happens to this thread.

    A fork must not find this thread inside SQLite: the child would inherit SQLite's internal
    mutexes locked by a thread it does not have, and hang on its first SQLite call. So the thread
    is stopped before every fork (`pause`) and started again in the parent (`resume`); the child
    starts its own with its first write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # Set by the thread, read and cleared by the writer; a stale read only delays a restart.
        self.remainder_left = False
        # Counted by the writer, so an idle thread does not checkpoint a WAL nobody wrote to.
        self.writes = 0
        self.stopping = threading.Event()
        self.stopped = False
        self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="trimo-checkpoint", daemon=True)
        self.thread.start()

    def finish(self, conn: sqlite3.Connection) -> None:
        """In the writer: copy the small remainder, so its next write starts the WAL over."""
        self.remainder_left = False
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def stop(self) -> None:
        """For good (the store is closed or dropped): the thread ends after its current pass."""
        self.stopped = True
        self.stopping.set()

    def close(self) -> None:
        self.stop()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def pause(self) -> None:
        """Before a fork: end the thread and wait until it has left SQLite."""
        self.stopping.set()
        self.thread.join(timeout=CHECKPOINT_JOIN_SECONDS)
        if self.thread.is_alive():
            log.warning(
                "the checkpoint thread of %s did not stop within %d s; forking anyway",
                self.path,
                CHECKPOINT_JOIN_SECONDS,
            )

    def resume(self) -> None:
        """After a fork, in the parent: a new thread takes over, unless the store was closed."""
        if not self.stopped and not self.thread.is_alive():
            self.stopping.clear()
            self._start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.exception(
                "the checkpoint thread cannot open %s; SQLite checkpoints alone", self.path
            )
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            last = seen = 0
            while not self.stopping.wait(CHECKPOINT_POLL_SECONDS):
                if self.writes != seen:
                    seen = self.writes
                    last = self._checkpoint(conn, last)
        except sqlite3.Error:
            log.exception("checkpoint thread stopped; SQLite checkpoints alone")
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, last: int) -> int:
        """One round of passes; returns the WAL's size in pages at the end."""
        while not self.stopping.is_set():
            busy, size, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # The pages written since the previous pass (all of them if the WAL started over).
            new = size - last if size >= last else size
            last = size
            if busy or size < CHECKPOINT_RESTART_PAGES:
                break
            if new <= CHECKPOINT_REMAINDER_PAGES:
                self.remainder_left = True
                break
        return last


_DELIVERY_WRITERS: weakref.WeakSet[_DeliveryWriter] = weakref.WeakSet()
# The writers `_before_fork` holds still, for the hooks after the fork.
_HELD_FOR_FORK: list[_DeliveryWriter] = []


def _before_fork() -> None:
    """No thread of the store is inside SQLite at the fork: every writer's write finishes first
    and none starts, and every checkpoint thread ends (the parent gets it back after)."""
    _DELIVERY_WRITER_LOCK.acquire()  # no writer is made meanwhile
    _HELD_FOR_FORK[:] = list(_DELIVERY_WRITERS)
    for writer in _HELD_FOR_FORK:
        writer.writing.acquire()
        if writer.checkpointer is not None:
            writer.checkpointer.pause()


def _after_fork_in_parent() -> None:
    for writer in _HELD_FOR_FORK:
        if writer.checkpointer is not None:
            writer.checkpointer.resume()
        writer.writing.release()
    _HELD_FOR_FORK.clear()
    _DELIVERY_WRITER_LOCK.release()


def _after_fork_in_child() -> None:
    # The parent's connections are not ours to use or close; the first write opens new ones and
    # starts this process's own checkpoint thread.
    for writer in _HELD_FOR_FORK:
        writer.forget()
    _HELD_FOR_FORK.clear()
    _DELIVERY_WRITER_LOCK.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN, so writes can use BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL survives a process crash; only an OS crash may lose the last commit.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("trimo_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def _check_fields(table: str, fields: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(fields) - known
    if unknown:
        raise TypeError(
            UNKNOWN_FIELDS.format(
                table=table, names=", ".join(sorted(unknown)), known=", ".join(sorted(known))
            )
        )


def _run_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(fields)
    if "failures" in values:
        values["failures_json"] = json.dumps(values.pop("failures"))
    if "report" in values:
        report = values.pop("report")
        values["report_json"] = json.dumps(report) if report is not None else None
    for key in ("state", "mode"):
        if key in values:
            values[key] = str(values[key])
    _check_fields("runs", values, _RUN_FIELDS)
    return values


def _event_values(
    run_id: int, kind: str, message: str, data: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "kind": kind,
        "message": message,
        "data_json": json.dumps(data) if data is not None else None,
        "created_at": utcnow(),
    }


def _event_row(run_id: int, kind: str, message: str, data: Mapping[str, Any] | None) -> EventRecord:
    return EventRecord(**_event_values(run_id, kind, message, data))


def _event(row: EventRecord) -> RunEventRow:
    return RunEventRow(
        id=row.id,
        run_id=row.run_id,
        kind=row.kind,
        message=row.message,
        data=json.loads(row.data_json) if row.data_json else None,
        created_at=row.created_at,
    )


def _pipeline(row: PipelineRecord) -> Pipeline:
    return Pipeline(
        id=row.id,
        repo=row.repo,
        key=row.key,
        kind=PipelineKind(row.kind),
        branch=row.branch,
        title=row.title,
        number=row.number,
        installation_id=row.installation_id,
        head_repo=row.head_repo,
        pr_number=row.pr_number,
        approved_sha=row.approved_sha,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _run(row: RunRecord) -> Run:
    return Run(
        id=row.id,
        pipeline_id=row.pipeline_id,
        state=RunState(row.state),
        mode=RunMode(row.mode),
        trigger=row.trigger,
        sender=row.sender,
        task=row.task,
        instructions=row.instructions,
        agent_command=row.agent_command,
        worker_id=row.worker_id,
        container_id=row.container_id,
        image_tag=row.image_tag,
        base_sha=row.base_sha,
        head_sha=row.head_sha,
        commits=row.commits,
        tests_passed=row.tests_passed,
        tests_failed=row.tests_failed,
        tests_skipped=row.tests_skipped,
        tests_errors=row.tests_errors,
        failures=json.loads(row.failures_json) if row.failures_json else [],
        summary=row.summary,
        report=json.loads(row.report_json) if row.report_json else None,
        reason=row.reason,
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        cancel_reason=row.cancel_reason,
        superseded_by=row.superseded_by,
        comment_id=row.comment_id,
        check_run_id=row.check_run_id,
        pr_number=row.pr_number,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
    )


def _installation(s: Session, row: InstallationRecord) -> Installation:
    repos = None
    if not row.all_repos:
        repos = sorted(
            s.scalars(
                select(InstallationRepoRecord.repo).where(
                    InstallationRepoRecord.installation_id == row.id
                )
            )
        )
    return Installation(id=row.id, account=row.account, repos=repos)
