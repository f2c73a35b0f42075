"""The fork gate: a pull request from a fork runs only at the commit a writer approved.

A fork's code is untrusted (DESIGN §8). Its run starts only once a person with the minimum
permission approved the head commit (`/trimo approve`), and runs exactly that commit: when the
head moved since, the run is refused before any container exists. It gets only the secrets the
server grants to forks (none by default). Its commits never go to a branch of the base
repository, where `push` workflows would run them with the repository's secrets: they go to the
fork's head branch when the pull request allows edits by maintainers, otherwise (or when GitHub
refuses the push) they are offered as a patch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bot.engine import HEAD_MOVED, PushTarget
from bot.github.client import GitHubClient, GitHubError
from bot.intents import RunIntent
from bot.states import PipelineKind
from bot.store import Pipeline, Run

if TYPE_CHECKING:
    from bot.github.service import GitHubService

log = logging.getLogger(__name__)

FORK_WAITING = (
    "This pull request comes from a fork, so Trimo waits for a person with write access to "
    "approve it for its head commit `{sha}`: comment `/trimo approve`."
)
NOT_APPROVED = "this pull request from a fork is not approved: /trimo approve"
PULL_UNREADABLE = "the pull request could not be read from GitHub ({problem}); retry the run"


def is_fork(pipeline: Pipeline) -> bool:
    return pipeline.kind == PipelineKind.PULL and pipeline.head_repo not in (None, pipeline.repo)


class ForkGate:
    """Decides whether, and how, a fork's pull request runs."""

    def __init__(self, service: GitHubService) -> None:
        self.service = service

    def admits(self, client: GitHubClient, intent: RunIntent, pipeline: Pipeline) -> bool:
        """Whether the fork PR's head is the approved commit; if not, say what to do."""
        head = intent.head_sha
        approved = pipeline.approved_sha
        if head is not None and approved == head:
            return True
        if head is not None and approved is not None:
            why = HEAD_MOVED.format(approved=approved[:7], head=head[:7])
        else:
            why = FORK_WAITING.format(sha=(head or "?")[:12])
        self.service.commands.reply(client, intent.repo, pipeline.number or 0, why)
        return False

    def approve(self, pipeline: Pipeline, sha: str) -> None:
        self.service.store.update_pipeline(pipeline.id, approved_sha=sha)

    def after_run(self, run: Run, pipeline: Pipeline) -> None:
        """Commits Trimo pushed to the fork's branch carry the approval on: they were made from
        the approved commit, so the next run may start from them."""
        report = run.report or {}
        if run.head_sha and run.commits and report.get("pushed_to"):
            self.service.store.update_pipeline(pipeline.id, approved_sha=run.head_sha)

    def bind(self, pipeline: Pipeline, client: GitHubClient) -> dict[str, Any]:
        """The RunContext fields of a fork's run, read from the pull request as it is now."""
        number = pipeline.number or 0
        fields: dict[str, Any] = {
            "fork": True,
            "start_ref": f"refs/pull/{number}/head",
            "approved_sha": pipeline.approved_sha,
            "patch_only": True,
        }
        if pipeline.approved_sha is None:
            return fields | {"refusal": NOT_APPROVED}
        owner, name = pipeline.repo.split("/", 1)
        try:
            pull = client.get_pull(owner, name, number)
        except GitHubError as exc:
            return fields | {"refusal": PULL_UNREADABLE.format(problem=exc)}
        if pull.head_sha != pipeline.approved_sha:
            moved = HEAD_MOVED.format(approved=pipeline.approved_sha[:7], head=pull.head_sha[:7])
            return fields | {"refusal": moved}
        if pull.maintainer_can_modify and pull.head_repo:
            settings = self.service.settings
            # A configured git_url (GHES, a mirror, tests) maps every repository, forks too.
            url = settings.repo_git_url(pull.head_repo) if settings.git_url else pull.head_clone_url
            fields |= {"push_to": PushTarget(url, pull.head_ref), "patch_only": False}
        return fields
