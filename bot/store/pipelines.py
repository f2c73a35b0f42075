"""Pipelines: one branch each (an issue's, a pull request's, a local repository's)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from bot.errors import TrimoError
from bot.states import PipelineKind
from bot.store.base import NO_SUCH_PIPELINE, StoreBase, check_fields, utcnow
from bot.store.models import Pipeline, pipeline_of
from bot.store.records import PipelineRecord

# The fields `update_pipeline` may set: not the identity (repo, key) nor the timestamps.
_PIPELINE_FIELDS = {c.key for c in PipelineRecord.__table__.columns} - {
    "id",
    "repo",
    "key",
    "created_at",
    "updated_at",
}


class Pipelines(StoreBase):
    """Pipelines, made on first use and found by (repository, key)."""

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
            return pipeline_of(s.get_one(PipelineRecord, pipeline_id))

    def get_pipeline(self, pipeline_id: int) -> Pipeline:
        with self._read() as s:
            row = s.get(PipelineRecord, pipeline_id)
            if row is None:
                raise TrimoError(NO_SUCH_PIPELINE.format(pipeline_id=pipeline_id))
            return pipeline_of(row)

    def find_pipeline(self, repo: str, key: str) -> Pipeline | None:
        with self._read() as s:
            row = s.scalars(
                select(PipelineRecord).where(PipelineRecord.repo == repo, PipelineRecord.key == key)
            ).one_or_none()
            return pipeline_of(row) if row else None

    def list_pipelines(self, repo: str | None = None) -> list[Pipeline]:
        with self._read() as s:
            stmt = select(PipelineRecord).order_by(PipelineRecord.id)
            if repo is not None:
                stmt = stmt.where(PipelineRecord.repo == repo)
            return [pipeline_of(r) for r in s.scalars(stmt)]

    def update_pipeline(self, pipeline_id: int, **fields: Any) -> None:
        check_fields("pipelines", fields, _PIPELINE_FIELDS)
        fields["updated_at"] = utcnow()
        with self._write() as s:
            s.execute(update(PipelineRecord).where(PipelineRecord.id == pipeline_id).values(fields))
