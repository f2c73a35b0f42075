"""The GitHub worker: turns stored intents into runs, answers, reactions and reports.

The webhook request only stored what a delivery asks for; every GitHub API call happens here, in
the worker. Authorization is checked here too: the sender's permission on the repository must
reach the configured minimum, or the run is `rejected` with one comment saying why.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import UTC, datetime
from typing import Any

from bot.commands import HELP_TEXT
from bot.engine import RunContext
from bot.errors import TrimoError
from bot.github.auth import AppAuth
from bot.github.client import GitHubClient, GitHubError
from bot.github.reporter import RESULT_CHECK, Reporter, RunView
from bot.intents import (
    ApproveIntent,
    CancelIntent,
    HelpIntent,
    InstallationIntent,
    RunIntent,
    StatusIntent,
    intents_from,
)
from bot.junit import TestReport
from bot.settings import Settings
from bot.states import PHASES, PipelineKind, RunState
from bot.store import Delivery, Pipeline, Run, Store
from bot.worker import dispatch
from bot.workspace import Remote

log = logging.getLogger(__name__)

REFUSED = (
    "@{sender} Trimo runs only for people with **{minimum}** permission on this repository "
    "(yours: {permission}). Ask a maintainer to trigger it."
)
FORK_WAITING = (
    "This pull request comes from a fork, so Trimo waits for a person with write access to "
    "approve it for its head commit `{sha}`: comment `/trimo approve`."
)
APPROVED = "Approved `{sha}` for Trimo runs by @{sender}."
NOTHING_TO_APPROVE = "Only pull requests from forks need `/trimo approve`."
STATUS_NONE = "No Trimo run on this {kind} yet. Label it `{label}` or comment `/trimo run …`."
STATUS_LINE = "Run {run_id}: **{state}**{reason} — branch `{branch}`."
HELP_UNKNOWN = "Unknown command `/trimo {unknown}`.{suggestion}\n\n"
NOT_A_TRIMO_CHECK = "check run {check_id} is not one of Trimo's runs"
PR_BODY = (
    "Closes #{number}\n\nTrimo's work on #{number}: each run pushes its commits to `{branch}` "
    "after the project's tests ran in its development container. This pull request stays a "
    "draft until a person marks it ready."
)


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "work"


def _task(title: str, body: str, number: int, kind: str) -> str:
    return f"# {title}\n\n{body.strip()}\n\n(GitHub {kind} #{number})\n"


class _Ids:
    """The run store as the reporter's IdStore."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def remember(self, run_id: int, kind: str, github_id: int) -> None:
        self.store.remember(run_id, kind, github_id)

    def recall(self, run_id: int, kind: str) -> int | None:
        return self.store.recall(run_id, kind)


class GitHubService:
    """Everything the worker does with GitHub: intents in, reports out."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        auth: AppAuth,
        write_interval: float = 1.0,
        edit_interval: float = 10.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.auth = auth
        self.write_interval = write_interval
        self.edit_interval = edit_interval
        self._clients: dict[tuple[int, str], GitHubClient] = {}
        self._reporters: dict[tuple[int, str], Reporter] = {}
        # One report of a run at a time: the queued report (delivery thread) and the first phase
        # (worker thread) must not both create the tracking comment or the check run.
        self._report_locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    # -- clients -----------------------------------------------------------------------------------

    def installation_for(self, repo: str, hint: int | None) -> int:
        if hint:
            return hint
        known = self.store.installation_for_repo(repo)
        if known:
            return known
        owner, name = repo.split("/", 1)
        return self.auth.repo_installation(owner, name)

    def client(self, installation_id: int, repo: str) -> GitHubClient:
        key = (installation_id, repo)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = GitHubClient.for_installation(
                    self.auth,
                    installation_id,
                    repo.split("/", 1)[1],
                    write_interval=self.write_interval,
                )
            return self._clients[key]

    def reporter(self, installation_id: int, repo: str) -> Reporter:
        """The repository's reporter; one per repository, so live edits are throttled per run."""
        client = self.client(installation_id, repo)
        key = (installation_id, repo)
        with self._lock:
            if key not in self._reporters:
                self._reporters[key] = Reporter(
                    client, _Ids(self.store), edit_interval=self.edit_interval
                )
            return self._reporters[key]

    def _report_lock(self, run_id: int) -> threading.Lock:
        with self._lock:
            return self._report_locks.setdefault(run_id, threading.Lock())

    # -- deliveries --------------------------------------------------------------------------------

    def process_pending(self) -> int:
        """Act on every stored delivery not yet processed; returns how many were handled."""
        done = 0
        while (delivery := self.store.claim_delivery()) is not None:
            self.process(delivery)
            done += 1
        return done

    def process(self, delivery: Delivery) -> None:
        """Act on one delivery's intents; it ends processed, or failed with the reason stored."""
        error = None
        try:
            for intent in intents_from(delivery.intents):
                self.handle(intent)
        except TrimoError as exc:
            # Said on purpose (GitHub refused, not one of Trimo's check runs): the reason is enough.
            log.warning("delivery %s failed: %s", delivery.delivery_id, exc)
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("delivery %s failed", delivery.delivery_id)
            error = f"{type(exc).__name__}: {exc}"
        self.store.finish_delivery(delivery.delivery_id, error)

    def handle(self, intent: Any) -> None:
        if isinstance(intent, RunIntent):
            self.on_run(intent)
        elif isinstance(intent, CancelIntent):
            self.on_cancel(intent)
        elif isinstance(intent, StatusIntent):
            self.on_status(intent)
        elif isinstance(intent, HelpIntent):
            self.on_help(intent)
        elif isinstance(intent, ApproveIntent):
            self.on_approve(intent)
        elif isinstance(intent, InstallationIntent):
            self.on_installation(intent)

    # -- intents -----------------------------------------------------------------------------------

    def _authorized(self, client: GitHubClient, repo: str, sender: str) -> tuple[bool, str]:
        owner, name = repo.split("/", 1)
        permission = client.get_permission(owner, name, sender)
        return self.settings.allows(permission), permission

    def _react(self, client: GitHubClient, intent: Any) -> None:
        if intent.comment_id is None:
            return
        owner, name = intent.repo.split("/", 1)
        try:
            client.add_reaction(
                owner,
                name,
                intent.comment_id,
                "eyes",
                review_comment=intent.comment_kind == "review",
            )
        except GitHubError as exc:  # a missing reaction is not worth failing the command
            log.warning("could not react to comment %s: %s", intent.comment_id, exc)

    def _reply(self, client: GitHubClient, repo: str, number: int, body: str) -> None:
        owner, name = repo.split("/", 1)
        client.create_comment(owner, name, number, body)

    def _pipeline(self, intent: RunIntent, installation_id: int) -> Pipeline:
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
        installation_id = self.installation_for(intent.repo, intent.installation_id)
        client = self.client(installation_id, intent.repo)
        task = None
        if intent.trigger == "check_run" and intent.check_run_id is not None:
            intent, task = self._from_check_run(intent)
        elif intent.kind == PipelineKind.PULL and (intent.is_fork is None or not intent.head_sha):
            intent = self._with_pull_head(client, intent)
        allowed, permission = self._authorized(client, intent.repo, intent.sender)
        pipeline = self._pipeline(intent, installation_id)
        if not allowed:
            run = self.store.create_run(
                pipeline.id,
                trigger=intent.trigger,
                task=_task(intent.title, intent.body, pipeline.number or 0, pipeline.kind.value),
                sender=intent.sender,
            )
            reason = REFUSED.format(
                sender=intent.sender, minimum=self.settings.min_permission, permission=permission
            )
            self.store.set_state(run.id, RunState.REJECTED, reason=reason)
            self._reply(client, intent.repo, pipeline.number or 0, reason)
            return
        self._react(client, intent)
        if intent.is_fork:
            head = intent.head_sha
            if head is None or pipeline.approved_sha != head:
                self._reply(
                    client,
                    intent.repo,
                    pipeline.number or 0,
                    FORK_WAITING.format(sha=(head or "?")[:12]),
                )
                return
        run = dispatch(
            self.store,
            pipeline,
            trigger=intent.trigger,
            task=task
            or _task(
                intent.title or pipeline.title,
                intent.body,
                pipeline.number or 0,
                pipeline.kind.value,
            ),
            mode=intent.mode,
            sender=intent.sender,
            instructions=intent.instructions,
            head_sha=intent.head_sha,
        )
        with self._report_lock(run.id):
            self.reporter(installation_id, intent.repo).on_queued(self.view(run))

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

    def on_cancel(self, intent: CancelIntent) -> None:
        kind = intent.kind.value if intent.kind else "issue"
        pipeline = self.store.find_pipeline(intent.repo, f"{kind}:{intent.number}")
        if intent.reason == "command":
            installation_id = self.installation_for(intent.repo, intent.installation_id)
            client = self.client(installation_id, intent.repo)
            allowed, permission = self._authorized(client, intent.repo, intent.sender)
            if not allowed:
                self._reply(
                    client,
                    intent.repo,
                    int(intent.number or 0),
                    REFUSED.format(
                        sender=intent.sender,
                        minimum=self.settings.min_permission,
                        permission=permission,
                    ),
                )
                return
            self._react(client, intent)
        if pipeline is None:
            return
        for run in self.store.live_runs(pipeline.id):
            why = (
                f"stopped by @{intent.sender}"
                if intent.reason == "command"
                else f"the {kind} was {intent.reason}"
            )
            if run.state == RunState.QUEUED:
                final = self.store.set_state(run.id, RunState.CANCELLED, reason=why)
                self.report(final)
            else:
                self.store.request_cancel(run.id, why)

    def on_status(self, intent: StatusIntent) -> None:
        installation_id = self.installation_for(intent.repo, intent.installation_id)
        client = self.client(installation_id, intent.repo)
        self._react(client, intent)
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
        self._reply(client, intent.repo, int(intent.number or 0), body)

    def on_help(self, intent: HelpIntent) -> None:
        installation_id = self.installation_for(intent.repo, intent.installation_id)
        client = self.client(installation_id, intent.repo)
        body = HELP_TEXT
        if intent.unknown:
            suggestion = f" Did you mean `/trimo {intent.suggestion}`?" if intent.suggestion else ""
            body = HELP_UNKNOWN.format(unknown=intent.unknown, suggestion=suggestion) + HELP_TEXT
        self._reply(client, intent.repo, int(intent.number or 0), body)

    def on_approve(self, intent: ApproveIntent) -> None:
        installation_id = self.installation_for(intent.repo, intent.installation_id)
        client = self.client(installation_id, intent.repo)
        allowed, permission = self._authorized(client, intent.repo, intent.sender)
        number = int(intent.number or 0)
        if not allowed:
            self._reply(
                client,
                intent.repo,
                number,
                REFUSED.format(
                    sender=intent.sender,
                    minimum=self.settings.min_permission,
                    permission=permission,
                ),
            )
            return
        owner, name = intent.repo.split("/", 1)
        pull = client.get_pull(owner, name, number)
        if pull.head_repo == intent.repo:
            self._reply(client, intent.repo, number, NOTHING_TO_APPROVE)
            return
        self._react(client, intent)
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
        pipeline = self._pipeline(run_intent, installation_id)
        self.store.update_pipeline(pipeline.id, approved_sha=pull.head_sha)
        self._reply(
            client,
            intent.repo,
            number,
            APPROVED.format(sha=pull.head_sha[:12], sender=intent.sender),
        )
        self.on_run(run_intent)

    def on_installation(self, intent: InstallationIntent) -> None:
        if intent.action == "deleted":
            self.store.delete_installation(intent.installation_id or 0)
        elif intent.action == "created":
            self.store.upsert_installation(
                intent.installation_id or 0, intent.account, intent.repositories
            )
        elif intent.action in ("added", "suspend", "unsuspend"):
            # Events come in any order: an installation not seen yet is recorded from this one.
            self.store.add_installation_repos(
                intent.installation_id or 0, intent.repositories, account=intent.account
            )
        elif intent.action == "removed":
            self.store.remove_installation_repos(intent.installation_id or 0, intent.repositories)

    # -- runs: context, views, reports -------------------------------------------------------------

    def context_for(self, run: Run) -> RunContext:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        installation_id = self.installation_for(pipeline.repo, pipeline.installation_id)
        token = self.auth.installation_token(installation_id, pipeline.repo.split("/", 1)[1])
        fork = pipeline.kind == PipelineKind.PULL and pipeline.head_repo not in (
            None,
            pipeline.repo,
        )
        return RunContext(
            remote=Remote(self.settings.repo_git_url(pipeline.repo), token=token),
            extra_secrets={"installation-token": token},
            # A fork's commits are in the base repository under the pull request's head ref.
            start_ref=f"refs/pull/{pipeline.number}/head" if fork else None,
        )

    def view(self, run: Run) -> RunView:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        web = f"{self.settings.web_url}/{pipeline.repo}"
        phase = run.state
        if run.state.finished:
            phase = next(
                (
                    RunState(e.message)
                    for e in reversed(self.store.events(run.id, kinds=["state"]))
                    if e.message in PHASES
                ),
                RunState.QUEUED,
            )
        elapsed = None
        if run.started_at:
            elapsed = ((run.finished_at or datetime.now(UTC)) - run.started_at).total_seconds()
        tests = None
        if run.tests_passed is not None:
            passed, failed = run.tests_passed, run.tests_failed or 0
            skipped, errors = run.tests_skipped or 0, run.tests_errors or 0
            tests = TestReport(
                passed=passed,
                failed=failed,
                skipped=skipped,
                errors=errors,
                total=passed + failed + skipped + errors,
                failures=[],
            )
        pr_number = pipeline.pr_number if pipeline.kind == PipelineKind.ISSUE else pipeline.number
        return RunView(
            head_sha=self._check_sha(run, pipeline),
            # The commit the tests ran on, when the run pushed one: it gets a check run too.
            result_sha=run.head_sha if run.commits else None,
            tail=(run.error or "").splitlines()[-30:] if run.state.finished else [],
            run_id=run.id,
            repo=pipeline.repo,
            number=pipeline.number or 0,
            state=run.state,
            # The check run goes on the commit the run started from (a PR's head when triggered).
            phase=phase,
            started_at=run.started_at,
            finished_at=run.finished_at,
            elapsed=elapsed,
            trigger=run.trigger,
            sender=run.sender,
            branch=pipeline.branch,
            branch_url=f"{web}/tree/{pipeline.branch}",
            pr_url=f"{web}/pull/{pr_number}" if pr_number else None,
            tests=tests,
            tests_exit_code=run.tests_exit_code,
            failures=run.failures,
            summary=run.summary,
            # The engine says only "cancelled"; the report says who or what cancelled the run.
            reason=run.cancel_reason
            if run.state == RunState.CANCELLED and run.cancel_reason
            else run.reason,
            superseded_by=run.superseded_by,
            commits=[(c[0], c[1]) for c in (run.report or {}).get("commits", [])],
            blocked=list((run.report or {}).get("network_blocked", [])),
            usage=run.usage,
        )

    def _check_sha(self, run: Run, pipeline: Pipeline) -> str | None:
        """The commit the run's check run follows from queued to completed: the branch's tip
        when the run started (a pull request's head when it was triggered)."""
        if pipeline.kind == PipelineKind.PULL:
            return run.base_sha or run.head_sha
        return run.base_sha

    def report(self, run: Run) -> None:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        installation_id = self.installation_for(pipeline.repo, pipeline.installation_id)
        reporter = self.reporter(installation_id, pipeline.repo)
        with self._report_lock(run.id):
            if run.state.finished:
                if pipeline.kind == PipelineKind.ISSUE and run.head_sha and run.commits:
                    self._ensure_pull(pipeline, installation_id)
                    run = self.store.get_run(run.id)
                reporter.on_finished(self.view(run))
            else:
                reporter.on_phase(self.view(run))
        if run.state.finished:
            with self._lock:
                self._report_locks.pop(run.id, None)

    def _ensure_pull(self, pipeline: Pipeline, installation_id: int) -> None:
        pipeline = self.store.get_pipeline(pipeline.id)
        if pipeline.pr_number:
            return
        client = self.client(installation_id, pipeline.repo)
        owner, name = pipeline.repo.split("/", 1)
        found = client.find_pull(owner, name, pipeline.branch)
        if found is None:
            default = client.get_repo(owner, name).default_branch
            found = client.create_pull(
                owner,
                name,
                head=pipeline.branch,
                base=default,
                title=f"{pipeline.title} (#{pipeline.number})",
                body=PR_BODY.format(number=pipeline.number, branch=pipeline.branch),
                draft=True,
            )
        self.store.update_pipeline(pipeline.id, pr_number=found[0])

    def observer_for(self, run: Run) -> _ReportObserver:
        return _ReportObserver(self)


class _ReportObserver:
    """Feeds a run's state changes to GitHub; a failed report never stops the run."""

    def __init__(self, service: GitHubService) -> None:
        self.service = service

    def state(self, run: Run) -> None:
        try:
            self.service.report(self.service.store.get_run(run.id))
        except Exception:
            log.exception("run %s: report failed", run.id)

    def logs(self, run: Run, lines: list[str]) -> None:
        pass
