"""Commands and authorization: who may make Trimo act, and the answer each command gets.

Every command (`run`, `retry`, `test`, `stop`, `status`, `help`, `approve`, an unknown verb), a
trigger label and a check run's Re-run need the sender to have the configured minimum permission
on the repository. Below it, Trimo says so at most once per sender and pipeline an hour (the
time is kept in the store, so a restart does not answer a flood again); the rest is only logged.
Nobody without the permission can make Trimo write more than that.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from bot.commands import HELP_TEXT
from bot.github.client import GitHubClient, GitHubError
from bot.github.outbox import marked, report_key
from bot.github.reporter import RESULT_CHECK
from bot.intents import (
    ApproveIntent,
    CancelIntent,
    HelpIntent,
    RunIntent,
    StatusIntent,
)
from bot.states import PipelineKind
from bot.store import Pipeline
from bot.store.outbox import Report
from bot.worker import dispatch

if TYPE_CHECKING:
    from bot.github.service import GitHubService

log = logging.getLogger(__name__)

REFUSAL_EVERY = timedelta(hours=1)
REFUSED = (
    "@{sender} Trimo runs only for people with **{minimum}** permission on this repository "
    "(yours: {permission}). Ask a maintainer to trigger it."
)
REFUSAL_NOT_REPEATED = (
    "%s (%s) may not command Trimo on %s %s; already told within the hour, so not again"
)
APPROVED = "Approved `{sha}` for Trimo runs by @{sender}."
NOTHING_TO_APPROVE = "Only pull requests from forks need `/trimo approve`."
STATUS_NONE = "No Trimo run on this {kind} yet. Label it `{label}` or comment `/trimo run …`."
STATUS_LINE = "Run {run_id}: **{state}**{reason} — branch `{branch}`."
HELP_UNKNOWN = "Unknown command `/trimo {unknown}`.{suggestion}\n\n"
NOT_A_TRIMO_CHECK = "check run {check_id} is not one of Trimo's runs"


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "work"


def task_text(title: str, body: str, number: int, kind: str) -> str:
    return f"# {title}\n\n{body.strip()}\n\n(GitHub {kind} #{number})\n"


def pipeline_key(intent: Any) -> str:
    kind = intent.kind.value if intent.kind else "issue"
    return f"{kind}:{intent.number}"


class Commands:
    """Acts on the intents of comments, labels and Re-runs, once the sender is authorized."""

    def __init__(self, service: GitHubService) -> None:
        self.service = service
        self.settings = service.settings
        self.store = service.store

    # -- authorization ---------------------------------------------------------------------------

    def permission(self, client: GitHubClient, repo: str, sender: str) -> tuple[bool, str]:
        """Whether `sender` reaches the minimum permission on `repo`, and their permission."""
        owner, name = repo.split("/", 1)
        permission = client.get_permission(owner, name, sender)
        return self.settings.allows(permission), permission

    def tell_refusal(self, intent: Any, permission: str) -> str | None:
        """The refusal text when the sender is to be told now (once an hour), else None."""
        key = pipeline_key(intent)
        if not self.store.take_refusal(intent.repo, key, intent.sender, REFUSAL_EVERY):
            log.info(REFUSAL_NOT_REPEATED, intent.sender, permission, intent.repo, key)
            return None
        return REFUSED.format(
            sender=intent.sender, minimum=self.settings.min_permission, permission=permission
        )

    def authorized(self, client: GitHubClient, intent: Any) -> bool:
        """Check the sender of a command; below the minimum, refuse (at most once an hour)."""
        allowed, permission = self.permission(client, intent.repo, intent.sender)
        if allowed:
            return True
        refusal = self.tell_refusal(intent, permission)
        if refusal is not None:
            self.reply(client, intent.repo, int(intent.number or 0), refusal)
        return False

    # -- answers -----------------------------------------------------------------------------------

    def react(self, client: GitHubClient, intent: Any) -> None:
        """Acknowledge an accepted command with a reaction (through the outbox)."""
        if intent.comment_id is None:
            return
        target = "review_comment" if intent.comment_kind == "review" else "comment"
        self.service.sender.put(
            Report(
                report_id=report_key("reaction"),
                lane=f"issue:{intent.repo}#{int(intent.number or 0)}",
                kind="reaction",
                installation_id=int(client.installation),
                repo=intent.repo,
                payload={"target": target, "id": int(intent.comment_id), "content": "eyes"},
            )
        )

    def reply(self, client: GitHubClient, repo: str, number: int, body: str) -> None:
        """Answer on the issue or pull request (through the outbox: sent once, in order)."""
        report_id = report_key("reply")
        self.service.sender.put(
            Report(
                report_id=report_id,
                lane=f"issue:{repo}#{number}",
                kind="comment",
                installation_id=int(client.installation),
                repo=repo,
                payload={"number": number, "body": marked(body, report_id)},
            )
        )

    # -- runs ------------------------------------------------------------------------------------

    def pipeline(self, intent: RunIntent, installation_id: int) -> Pipeline:
        kind = PipelineKind(intent.kind or "issue")
        number = int(intent.number or 0)
        if kind == PipelineKind.PULL and intent.head_ref and not intent.is_fork:
            branch = intent.head_ref
        elif kind == PipelineKind.PULL:
            branch = f"trimo/pr-{number}-{_slug(intent.title)}"
        else:
            branch = f"trimo/{number}-{_slug(intent.title)}"
        return self.store.get_or_create_pipeline(
            repo=intent.repo,
            key=f"{kind.value}:{number}",
            kind=kind,
            branch=branch,
            title=intent.title,
            number=number,
            installation_id=installation_id,
            head_repo=intent.head_repo,
        )

    def on_run(self, intent: RunIntent) -> None:
        service = self.service
        installation_id = service.installation_for(intent.repo, intent.installation_id)
        client = service.client(installation_id, intent.repo)
        task = None
        if intent.trigger == "check_run" and intent.check_run_id is not None:
            intent, task = self._from_check_run(intent)
        elif intent.kind == PipelineKind.PULL and (intent.is_fork is None or not intent.head_sha):
            intent = self._with_pull_head(client, intent)
        allowed, permission = self.permission(client, intent.repo, intent.sender)
        pipeline = self.pipeline(intent, installation_id)
        if not allowed:
            refusal = self.tell_refusal(intent, permission)
            if refusal is None:
                return
            # Rejected as it is recorded: a worker free at this moment cannot claim it.
            self.store.create_run(
                pipeline.id,
                trigger=intent.trigger,
                task=task_text(
                    intent.title, intent.body, pipeline.number or 0, pipeline.kind.value
                ),
                sender=intent.sender,
                refused=refusal,
            )
            self.reply(client, intent.repo, pipeline.number or 0, refusal)
            return
        self.react(client, intent)
        if intent.is_fork and not service.forks.admits(client, intent, pipeline):
            return
        # Processing this delivery again (a retry after a failure further on, the store gone
        # the moment after the run was queued) queues no second run: the run and the delivery's
        # claim to it are one transaction, and the run it queued is reported again (the outbox
        # sends nothing twice).
        key = report_key("run")
        known = self.store.delivery_run(key)
        if known is not None:
            service.reports.queued(self.store.get_run(known), installation_id)
            return
        run = dispatch(
            self.store,
            pipeline,
            trigger=intent.trigger,
            task=task
            or task_text(
                intent.title or pipeline.title,
                intent.body,
                pipeline.number or 0,
                pipeline.kind.value,
            ),
            mode=intent.mode,
            sender=intent.sender,
            instructions=intent.instructions,
            head_sha=intent.head_sha,
            delivery_key=key,
        )
        service.reports.queued(run, installation_id)

    def _from_check_run(self, intent: RunIntent) -> tuple[RunIntent, str]:
        """The intent of a check run's "Re-run", and the task of the run it repeats."""
        check_id = int(intent.check_run_id or 0)
        run_id = self.store.run_for_posted("check_run", check_id) or self.store.run_for_posted(
            RESULT_CHECK, check_id
        )
        if run_id is None:
            raise GitHubError(NOT_A_TRIMO_CHECK.format(check_id=intent.check_run_id))
        previous = self.store.get_run(run_id)
        pipeline = self.store.get_pipeline(previous.pipeline_id)
        rerun = intent.model_copy(
            update={
                "kind": pipeline.kind,
                "number": pipeline.number,
                "title": pipeline.title,
                "head_ref": pipeline.branch if pipeline.kind == PipelineKind.PULL else None,
                "head_repo": pipeline.head_repo,
                "is_fork": bool(pipeline.head_repo and pipeline.head_repo != pipeline.repo),
                "head_sha": intent.head_sha or previous.head_sha,
                "instructions": previous.instructions,
                "mode": previous.mode,
            }
        )
        return rerun, previous.task

    def _with_pull_head(self, client: GitHubClient, intent: RunIntent) -> RunIntent:
        """A PR intent completed with the PR's head (a comment's payload does not carry it)."""
        owner, name = intent.repo.split("/", 1)
        pull = client.get_pull(owner, name, int(intent.number or 0))
        return intent.model_copy(
            update={
                "head_sha": pull.head_sha,
                "head_ref": pull.head_ref,
                "head_repo": pull.head_repo or None,
                # A deleted fork leaves no head repository: still a fork.
                "is_fork": pull.head_repo != intent.repo,
            }
        )

    # -- other commands --------------------------------------------------------------------------

    def on_cancel(self, intent: CancelIntent) -> None:
        kind = intent.kind.value if intent.kind else "issue"
        pipeline = self.store.find_pipeline(intent.repo, f"{kind}:{intent.number}")
        if intent.reason == "command":
            installation_id = self.service.installation_for(intent.repo, intent.installation_id)
            client = self.service.client(installation_id, intent.repo)
            if not self.authorized(client, intent):
                return
            self.react(client, intent)
        if pipeline is None:
            return
        for run in self.store.live_runs(pipeline.id):
            why = (
                f"stopped by @{intent.sender}"
                if intent.reason == "command"
                else f"the {kind} was {intent.reason}"
            )
            after, before_it_started = self.store.cancel_run(run.id, why)
            if before_it_started:
                # Cancelled before any worker took it: no worker reports it, so this does.
                self.service.report(after)

    def on_status(self, intent: StatusIntent) -> None:
        installation_id = self.service.installation_for(intent.repo, intent.installation_id)
        client = self.service.client(installation_id, intent.repo)
        if not self.authorized(client, intent):
            return
        self.react(client, intent)
        kind = intent.kind.value if intent.kind else "issue"
        pipeline = self.store.find_pipeline(intent.repo, f"{kind}:{intent.number}")
        runs = self.store.list_runs(limit=1, pipeline_id=pipeline.id) if pipeline else []
        if not runs or pipeline is None:
            body = STATUS_NONE.format(
                kind="pull request" if kind == "pull" else "issue",
                label=self.settings.trigger_label,
            )
        else:
            run = runs[0]
            body = STATUS_LINE.format(
                run_id=run.id,
                state=run.state.value,
                reason=f" ({run.reason})" if run.reason else "",
                branch=pipeline.branch,
            )
        self.reply(client, intent.repo, int(intent.number or 0), body)

    def on_help(self, intent: HelpIntent) -> None:
        installation_id = self.service.installation_for(intent.repo, intent.installation_id)
        client = self.service.client(installation_id, intent.repo)
        if not self.authorized(client, intent):
            return
        body = HELP_TEXT
        if intent.unknown:
            suggestion = f" Did you mean `/trimo {intent.suggestion}`?" if intent.suggestion else ""
            body = HELP_UNKNOWN.format(unknown=intent.unknown, suggestion=suggestion) + HELP_TEXT
        self.reply(client, intent.repo, int(intent.number or 0), body)

    def on_approve(self, intent: ApproveIntent) -> None:
        installation_id = self.service.installation_for(intent.repo, intent.installation_id)
        client = self.service.client(installation_id, intent.repo)
        number = int(intent.number or 0)
        if not self.authorized(client, intent):
            return
        owner, name = intent.repo.split("/", 1)
        pull = client.get_pull(owner, name, number)
        if pull.head_repo == intent.repo:
            self.reply(client, intent.repo, number, NOTHING_TO_APPROVE)
            return
        self.react(client, intent)
        known = self.store.find_pipeline(intent.repo, f"{PipelineKind.PULL.value}:{number}")
        run_intent = RunIntent(
            repo=intent.repo,
            installation_id=installation_id,
            sender=intent.sender,
            sender_type=intent.sender_type,
            delivery_id=intent.delivery_id,
            kind=PipelineKind.PULL,
            number=number,
            title=known.title if known else f"pull request #{number}",
            trigger="command",
            head_sha=pull.head_sha,
            head_ref=pull.head_ref,
            head_repo=pull.head_repo,
            is_fork=True,
        )
        pipeline = self.pipeline(run_intent, installation_id)
        self.service.forks.approve(pipeline, pull.head_sha)
        self.reply(
            client,
            intent.repo,
            number,
            APPROVED.format(sha=pull.head_sha[:12], sender=intent.sender),
        )
        self.on_run(run_intent)
