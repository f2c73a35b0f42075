"""The GitHub worker: stored deliveries in; runs, answers and reports out.

The webhook request only stored what a delivery asks for; every GitHub API call happens here, in
the worker. This module holds what every concern shares (the clients and reporters of each
installation and repository, installation handling) and hands each intent to its concern:

- `deliveries`: the stored deliveries, in parallel across installations;
- `commands`: who may make Trimo act, and each command's answer;
- `forks`: the fork gate (approved commit, no secrets, no push to the base repository);
- `run_reports`: the tracking comment, the check run and the draft PR of each run;
- `outbox`: every write to GitHub, stored first, then sent once and in order by the sender.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from datetime import timedelta
from typing import Any

from bot.engine import RunContext
from bot.github.auth import AppAuth
from bot.github.client import GitHubClient
from bot.github.commands import Commands
from bot.github.deliveries import DeliveryLanes
from bot.github.forks import ForkGate, is_fork
from bot.github.outbox import ReportSender
from bot.github.reporter import EDIT_INTERVAL_SECONDS, Reporter, RunView
from bot.github.run_reports import PostedIds, ReportObserver, RunReports
from bot.intents import (
    ApproveIntent,
    CancelIntent,
    HelpIntent,
    InstallationIntent,
    RunIntent,
    StatusIntent,
)
from bot.settings import Settings
from bot.store import Run, Store
from bot.worker import worker_id
from bot.workspace import Remote

log = logging.getLogger(__name__)


class GitHubService:
    """Everything the worker does with GitHub: intents in, reports out."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        auth: AppAuth,
        write_interval: float = 1.0,
        edit_interval: float = EDIT_INTERVAL_SECONDS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.auth = auth
        self.write_interval = write_interval
        self.edit_interval = edit_interval
        self._clients: dict[tuple[int, str], GitHubClient] = {}
        self._send_clients: dict[tuple[int, str], GitHubClient] = {}
        self._reporters: dict[tuple[int, str], Reporter] = {}
        self._lock = threading.Lock()
        self.deliveries = DeliveryLanes(
            store,
            self.handle,
            owner=worker_id(),
            attempts=settings.delivery_attempts,
            backoff=settings.delivery_backoff_seconds,
            lease=settings.delivery_lease_seconds,
        )
        self.commands = Commands(self)
        self.forks = ForkGate(self)
        self.reports = RunReports(self)
        self.sender = ReportSender(
            store,
            self.send_client,
            worker_id(),
            backoff=settings.report_backoff_seconds,
            max_backoff=settings.report_max_backoff_seconds,
            # A killed worker's report waits no longer for another than its runs do.
            lease=timedelta(seconds=settings.lease_seconds),
        )
        self.sender.pull_opened = self.reports.refresh

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

    def send_client(self, installation_id: int, repo: str) -> GitHubClient:
        """The client the outbox sends with: one attempt per call, since the outbox retries
        (and a rate limit then waits in the store, not in a thread)."""
        key = (installation_id, repo)
        with self._lock:
            if key not in self._send_clients:
                self._send_clients[key] = GitHubClient.for_installation(
                    self.auth,
                    installation_id,
                    repo.split("/", 1)[1],
                    write_interval=self.write_interval,
                    max_attempts=1,
                )
            return self._send_clients[key]

    def reporter(self, installation_id: int, repo: str) -> Reporter:
        """The repository's reporter; one per repository, so live edits are throttled per run."""
        client = self.client(installation_id, repo)
        key = (installation_id, repo)
        with self._lock:
            if key not in self._reporters:
                self._reporters[key] = Reporter(
                    client,
                    PostedIds(self.store),
                    edit_interval=self.edit_interval,
                    sender=self.sender,
                    installation_id=installation_id,
                )
            return self._reporters[key]

    # -- deliveries --------------------------------------------------------------------------------

    def process_pending(self) -> int:
        """Hand every stored delivery not yet processed to its installation's lane."""
        return self.deliveries.process_pending()

    def handle(self, intent: Any) -> None:
        if isinstance(intent, RunIntent):
            self.commands.on_run(intent)
        elif isinstance(intent, CancelIntent):
            self.commands.on_cancel(intent)
        elif isinstance(intent, StatusIntent):
            self.commands.on_status(intent)
        elif isinstance(intent, HelpIntent):
            self.commands.on_help(intent)
        elif isinstance(intent, ApproveIntent):
            self.commands.on_approve(intent)
        elif isinstance(intent, InstallationIntent):
            self.on_installation(intent)

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

    # -- runs --------------------------------------------------------------------------------------

    def context_for(self, run: Run) -> RunContext:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        installation_id = self.installation_for(pipeline.repo, pipeline.installation_id)
        repository = pipeline.repo.split("/", 1)[1]

        def token(renew: bool = False) -> str:
            # Asked again before every push: renewed when under 10 minutes of life remain.
            return self.auth.installation_token(installation_id, repository, renew=renew)

        first = token()
        context = RunContext(
            remote=Remote(self.settings.repo_git_url(pipeline.repo), token=first),
            extra_secrets={"installation-token": first},
            repo=pipeline.repo,
            token=token,
        )
        if is_fork(pipeline):
            client = self.client(installation_id, pipeline.repo)
            context = dataclasses.replace(context, **self.forks.bind(pipeline, client))
        return context

    def view(self, run: Run) -> RunView:
        return self.reports.view(run)

    def report(self, run: Run) -> None:
        self.reports.report(run)

    def observer_for(self, run: Run) -> ReportObserver:
        return ReportObserver(self.reports)
