"""Run reports: what a run shows on GitHub (tracking comment, check run, draft PR), and when.

Which commit carries a run's check run: a pull request run's follows the PR's head from queued
to completed; an issue run's goes only on the commit the run pushed (the draft PR's head), so a
run that pushed nothing reports in its comment alone and the default branch is never marked.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bot.github.forks import is_fork
from bot.github.reporter import RunView
from bot.junit import TestReport
from bot.logs import about_run
from bot.states import PHASES, PipelineKind, RunState
from bot.store import Pipeline, Run, Store
from bot.store.outbox import Report

if TYPE_CHECKING:
    from bot.github.service import GitHubService

log = logging.getLogger(__name__)

PR_BODY = (
    "Closes #{number}\n\nTrimo's work on #{number}: each run pushes its commits to `{branch}` "
    "after the project's tests ran in its development container. This pull request stays a "
    "draft until a person marks it ready."
)


class PostedIds:
    """The run store as the reporter's IdStore."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def remember(self, run_id: int, kind: str, github_id: int) -> None:
        self.store.remember(run_id, kind, github_id)

    def recall(self, run_id: int, kind: str) -> int | None:
        return self.store.recall(run_id, kind)


class RunReports:
    """Turns a run's row into its report and hands it to the repository's reporter."""

    def __init__(self, service: GitHubService) -> None:
        self.service = service
        self.store = service.store
        # One report of a run at a time: the queued report (delivery thread) and the first phase
        # (worker thread) must not both create the tracking comment or the check run.
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def _run_lock(self, run_id: int) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(run_id, threading.Lock())

    def queued(self, run: Run, installation_id: int) -> None:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        with self._run_lock(run.id):
            self.service.reporter(installation_id, pipeline.repo).on_queued(self.view(run))

    def report(self, run: Run) -> None:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        installation_id = self.service.installation_for(pipeline.repo, pipeline.installation_id)
        reporter = self.service.reporter(installation_id, pipeline.repo)
        with self._run_lock(run.id):
            if run.state.finished:
                if pipeline.kind == PipelineKind.ISSUE and run.head_sha and run.commits:
                    self._ensure_pull(pipeline, installation_id, run.id)
                    run = self.store.get_run(run.id)
                if is_fork(pipeline):
                    self.service.forks.after_run(run, pipeline)
                reporter.on_finished(self.view(run))
            else:
                reporter.on_phase(self.view(run))
        if run.state.finished:
            with self._lock:
                self._locks.pop(run.id, None)

    def view(self, run: Run) -> RunView:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        settings = self.service.settings
        web = f"{settings.web_url}/{pipeline.repo}"
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
        report = run.report or {}
        pushed = bool(run.commits) and not report.get("not_pushed")
        branch: str | None = pipeline.branch
        branch_url: str | None = f"{web}/tree/{pipeline.branch}"
        if is_fork(pipeline):
            # A fork's run has no branch in the base repository; at most the fork's head branch.
            branch = str(report["branch"]) if pushed and report.get("branch") else None
            fork_web = f"{settings.web_url}/{pipeline.head_repo}"
            branch_url = f"{fork_web}/tree/{branch}" if branch else None
        pr_number = pipeline.pr_number if pipeline.kind == PipelineKind.ISSUE else pipeline.number
        return RunView(
            head_sha=self._check_sha(run, pipeline),
            # The commit the tests ran on, when the run pushed one: it gets a check run too.
            result_sha=run.head_sha if pushed else None,
            tail=(run.error or "").splitlines()[-30:] if run.state.finished else [],
            run_id=run.id,
            repo=pipeline.repo,
            number=pipeline.number or 0,
            state=run.state,
            phase=phase,
            started_at=run.started_at,
            finished_at=run.finished_at,
            elapsed=elapsed,
            trigger=run.trigger,
            sender=run.sender,
            branch=branch,
            branch_url=branch_url,
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
            log_url=self.service.settings.run_url(run.id),
            commits=[(c[0], c[1]) for c in report.get("commits", [])],
            blocked=list(report.get("network_blocked", [])),
            usage=run.usage,
            not_pushed=report.get("not_pushed"),
            patch=report.get("patch"),
            patch_path=report.get("patch_path"),
        )

    def _check_sha(self, run: Run, pipeline: Pipeline) -> str | None:
        """The commit the run's check run follows from queued to completed: a pull request's
        head; none for an issue run, whose only check run goes on the commit it pushed."""
        if pipeline.kind == PipelineKind.PULL:
            return run.base_sha or run.head_sha
        return None

    def refresh(self, run_id: int) -> None:
        """Report a run again from its row (its pull request was opened after its report)."""
        with about_run(run_id):
            self.report(self.store.get_run(run_id))

    def sweep(self) -> None:
        """Give each finished run whose final report was never stored (finished by the reaper,
        by `trimo runs cancel`, or left by a crash between its end and its report) that report,
        so that no check run stays in progress."""
        for run_id in self.service.sender.outbox.runs_without_final("comment"):
            run = self.store.get_run(run_id)
            with about_run(run_id):
                log.info("run %s finished without its final report; reporting it now", run_id)
                try:
                    self.report(run)
                except Exception:
                    log.exception("run %s: final report could not be stored", run_id)

    def _ensure_pull(self, pipeline: Pipeline, installation_id: int, run_id: int) -> None:
        """The draft pull request of an issue's pipeline, as a report ahead of the run's own:
        sent at once when GitHub takes it, so the final report links it."""
        pipeline = self.store.get_pipeline(pipeline.id)
        if pipeline.pr_number:
            return
        self.service.sender.put(
            Report(
                report_id=f"pipeline:{pipeline.id}:pull",
                lane=f"run:{run_id}",
                kind="pull",
                installation_id=installation_id,
                repo=pipeline.repo,
                payload={
                    "head": pipeline.branch,
                    "base": None,
                    "title": f"{pipeline.title} (#{pipeline.number})",
                    "body": PR_BODY.format(number=pipeline.number, branch=pipeline.branch),
                    "draft": True,
                    "pipeline_id": pipeline.id,
                },
                run_id=run_id,
                final=True,
            )
        )


class ReportObserver:
    """Feeds a run's state changes to GitHub; a failed report never stops the run."""

    def __init__(self, reports: RunReports) -> None:
        self.reports = reports

    def state(self, run: Run) -> None:
        with about_run(run.id):
            try:
                self.reports.report(self.reports.store.get_run(run.id))
            except Exception:
                log.exception("run %s: report failed", run.id)

    def logs(self, run: Run, lines: list[str]) -> None:
        pass
