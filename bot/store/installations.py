"""Installations of the GitHub App and their repositories, the ids of what Trimo posted on
GitHub for a run, and refusals already told."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from bot.store.base import StoreBase, utcnow
from bot.store.models import Installation
from bot.store.records import (
    InstallationRecord,
    InstallationRepoRecord,
    PostedRecord,
    RefusalRecord,
)


class Installations(StoreBase):
    """Which installation covers a repository; posted GitHub ids; refusal notices."""

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
