"""The sender: stored reports out to GitHub, each exactly once, in order per lane.

Every write Trimo makes to GitHub (the tracking comment and its edits, check runs, the draft
pull request, replies to commands, reactions, labels) is a `Report` in the outbox
(bot/store/outbox.py) before anything is sent. The thread that stored it tries to send its lane
at once, so a report appears without waiting for a poll; what GitHub does not take then (a 5xx,
a dropped connection, a rate limit) is sent by the worker's sender thread later: after what
`retry-after` or `x-ratelimit-reset` says when GitHub says it, else with exponential backoff.

Exactly once. A report is marked sent only after GitHub answered; what it created (a comment's,
a check run's or a pull request's id) is kept with it, so later versions edit that object. A
create whose answer never came (a 502 after GitHub did the work, a crash between the answer and
the store) is taken again with its attempt count raised, and before it is sent again the sender
looks for what it would have made: a comment by the marker it carries (`<!-- trimo:... -->`), a
check run by its `external_id` on the commit, a pull request by its head branch. A reaction and
a label are the same request twice on GitHub's side (it answers 200 for one that exists).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.github.client import MARKER, GitHubClient, GitHubError, GitHubWriteError
from bot.logs import delivery_id_var
from bot.store import Store
from bot.store.outbox import Outbox, OutboxEntry, Report

log = logging.getLogger(__name__)

# A report being sent is leased to its sender, which renews the lease every third of it for as
# long as the write takes (PyGithub's 15 s timeout, a write gate's pause): a sender that died
# mid-send leaves its report, and the lane behind it, to another once the lease lapsed. The
# workers give it the length of their run leases (settings.lease_seconds).
REPORT_LEASE = timedelta(seconds=30)
BACKOFF_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 15 * 60.0
POLL_SECONDS = 1.0
# How often the sender looks for finished runs whose final report was never stored.
SWEEP_SECONDS = 5.0
# GitHub answers with these when no retry can change the outcome; the report is marked failed.
FINAL_STATUSES = frozenset({400, 404, 410, 422})
REPLY_MARKER = "<!-- trimo:report={report_id} -->"

RATE_LIMITED = "waiting out GitHub's rate limit on this installation"

_SENDING = threading.local()
# Until when (time.monotonic()) GitHub asked each installation to send nothing, in this process.
_PAUSED: dict[str, float] = {}
_PAUSED_LOCK = threading.Lock()


def _pause(client: GitHubClient, seconds: float) -> None:
    key = f"{client.api_url}#{client.installation}"
    with _PAUSED_LOCK:
        _PAUSED[key] = max(_PAUSED.get(key, 0.0), time.monotonic() + seconds)


def _paused_for(client: GitHubClient) -> float:
    """Seconds this installation is still asked to wait (0: none)."""
    with _PAUSED_LOCK:
        until = _PAUSED.get(f"{client.api_url}#{client.installation}", 0.0)
    return max(until - time.monotonic(), 0.0)


# Within one delivery's processing: how many reports it stored so far (see `report_key`).
_DELIVERY_REPORTS: ContextVar[list[int] | None] = ContextVar("trimo_delivery_reports", default=None)


@contextmanager
def delivery_reports() -> Iterator[None]:
    """Number the reports a delivery's processing stores, so that processing it again (a retry)
    stores the same report ids, which the outbox has: nothing is answered twice."""
    token = _DELIVERY_REPORTS.set([0])
    try:
        yield
    finally:
        _DELIVERY_REPORTS.reset(token)


def report_key(kind: str) -> str:
    """The id of the next report the current delivery stores (random outside a delivery)."""
    counter, delivery = _DELIVERY_REPORTS.get(), delivery_id_var.get()
    if counter is None or delivery is None:
        return f"{kind}:{uuid.uuid4().hex}"
    counter[0] += 1
    return f"delivery:{delivery}:{counter[0]}:{kind}"


def marked(body: str, report_id: str) -> str:
    """A reply's body with the marker the sender finds it by after an unanswered create."""
    return body if MARKER.search(body) else f"{body}\n\n{REPLY_MARKER.format(report_id=report_id)}"


class ReportSender:
    """Sends the outbox's reports with the clients of `client_for` (one attempt per call)."""

    def __init__(
        self,
        store: Store,
        client_for: Callable[[int, str], GitHubClient],
        owner: str,
        *,
        backoff: float = BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
        lease: timedelta = REPORT_LEASE,
    ) -> None:
        self.store = store
        self.outbox = Outbox(store)
        self._client_for = client_for
        self.owner = owner
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.lease = lease
        self._wake = threading.Event()
        # The reports this process is sending now, whose leases the renewer keeps.
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        # Runs whose pull request the sender thread opened: their final report names it.
        self.pull_opened: Callable[[int], None] | None = None

    def put(self, report: Report, *, send: bool = True) -> bool:
        """Store a report; with `send`, try its lane now (what GitHub refuses goes later)."""
        changed = self.outbox.put(report)
        if send and not sending():
            self.send(report.lane)
        self._wake.set()
        return changed

    def put_all(self, reports: list[Report], lane: str) -> None:
        """Store several reports of `lane` at once (no sender sees some without the others),
        then try the lane now."""
        self.outbox.put_all(reports)
        if not sending():
            self.send(lane)
        self._wake.set()

    def send(self, lane: str | None = None) -> list[OutboxEntry]:
        """Send what is due (of `lane`, or of every lane) until nothing is; returns what went."""
        done: list[OutboxEntry] = []
        previous = sending()
        _SENDING.active = True
        try:
            while (entry := self.outbox.take(self.owner, self.lease, lane)) is not None:
                with self._holding(entry):
                    if self._send_one(entry):
                        done.append(entry)
        finally:
            _SENDING.active = previous
        return done

    def run_forever(self, stop: threading.Event, sweep: Callable[[], None] | None = None) -> None:
        """The worker's sender thread: due reports out, and the sweep, until `stop`."""
        swept = float("-inf")
        while not stop.is_set():
            try:
                if sweep is not None and time.monotonic() - swept >= SWEEP_SECONDS:
                    swept = time.monotonic()
                    sweep()
                for entry in self.send():
                    if entry.kind == "pull" and entry.run_id is not None and self.pull_opened:
                        self.pull_opened(entry.run_id)
                wait = POLL_SECONDS
                due = self.outbox.next_due()
                if due is not None:
                    wait = min(max((due - datetime.now(UTC)).total_seconds(), 0.01), wait)
            except Exception:
                log.exception("sending reports failed; retrying")
                wait = 5.0
            self._wake.wait(wait)
            self._wake.clear()

    # ---- leases ------------------------------------------------------------------------------

    @contextmanager
    def _holding(self, entry: OutboxEntry) -> Iterator[None]:
        """Keep `entry`'s lease while the block sends it."""
        with self._held_lock:
            self._held.add(entry.id)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="trimo-report-leases", daemon=True
                )
                self._renewer.start()
        try:
            yield
        finally:
            with self._held_lock:
                self._held.discard(entry.id)

    def _renew_forever(self) -> None:
        every = self.lease.total_seconds() / 3
        while True:
            time.sleep(every)
            with self._held_lock:
                held = set(self._held)
                if not held:
                    self._renewer = None
                    return
            try:
                self.outbox.renew(self.owner, held, self.lease)
            except Exception:
                log.warning("report leases could not be renewed; trying again", exc_info=True)

    # ---- one report -------------------------------------------------------------------------

    def _send_one(self, entry: OutboxEntry) -> bool:
        client = self._client_for(entry.installation_id, entry.repo)
        paused = _paused_for(client)
        if paused > 0:
            # GitHub's rate limit holds for the whole installation: nothing is sent to it until
            # the time it named, and this report waits as long.
            self.outbox.retry_later(entry, RATE_LIMITED, paused)
            return False
        try:
            github_id, url = self._deliver(entry, client)
        except GitHubWriteError as exc:
            if exc.status in (403, 429) and exc.retry_after is not None:
                wait = exc.retry_after  # what GitHub asked for
                _pause(client, wait)
            else:
                wait = self._backoff(entry.attempts)
            log.warning("report %s: %s; again in %.1f s", entry.report_id, exc, wait)
            self.outbox.retry_later(entry, str(exc), wait)
            return False
        except GitHubError as exc:
            if exc.status in FINAL_STATUSES:
                log.error("report %s not sent, GitHub refused it: %s", entry.report_id, exc)
                self.outbox.fail(entry, str(exc))
                return False
            wait = self._backoff(entry.attempts)
            log.warning("report %s: %s; again in %.1f s", entry.report_id, exc, wait)
            self.outbox.retry_later(entry, str(exc), wait)
            return False
        except Exception as exc:  # the store, the token, anything: the report waits, never lost
            wait = self._backoff(entry.attempts)
            log.exception("report %s failed; again in %.1f s", entry.report_id, wait)
            self.outbox.retry_later(entry, f"{type(exc).__name__}: {exc}", wait)
            return False
        self.outbox.sent(entry, github_id, url)
        posted = entry.payload.get("posted")
        if posted and entry.run_id is not None and github_id is not None:
            self.store.remember(entry.run_id, str(posted), github_id)
            if entry.kind == "check_run" and entry.payload.get("status") == "completed":
                self.store.remember(entry.run_id, f"{posted}_completed", github_id)
        if entry.kind == "pull" and github_id is not None and entry.payload.get("pipeline_id"):
            self.store.update_pipeline(int(entry.payload["pipeline_id"]), pr_number=github_id)
        return True

    def _backoff(self, attempts: int) -> float:
        return float(min(self.backoff * 2 ** max(attempts - 1, 0), self.max_backoff))

    def _deliver(self, entry: OutboxEntry, client: GitHubClient) -> tuple[int | None, str | None]:
        owner, repo = entry.repo.split("/", 1)
        p = entry.payload
        # A report taken before whose answer never came: what it made may exist already.
        unsure = entry.attempts > 1
        known = entry.github_id
        if known is None and p.get("posted") and entry.run_id is not None:
            known = self.store.recall(entry.run_id, str(p["posted"]))
        if entry.kind == "comment":
            number, body = int(p["number"]), str(p["body"])
            if known is not None:
                # After an edit whose answer never came, GitHub may show this body already.
                if not unsure or client.get_comment_body(owner, repo, known) != body:
                    client.update_comment(owner, repo, known, body)
                return known, entry.github_url
            marker = MARKER.search(body)
            if unsure and marker is not None:
                found = client.find_comment(owner, repo, number, marker.group(0))
                if found is not None:
                    self.outbox.found(entry, found[0], found[1])
                    # It carries the version that was sent then; this one may be newer.
                    client.update_comment(owner, repo, found[0], body)
                    return found
            return client.create_comment(owner, repo, number, body)
        if entry.kind == "check_run":
            return self._check_run(client, owner, repo, entry, known, unsure), None
        if entry.kind == "pull":
            # One open already (a person's, or a create that landed): that one is the PR.
            head = str(p["head"])
            found_pull = client.find_pull(owner, repo, head)
            if found_pull is None:
                base = p.get("base") or client.get_repo(owner, repo).default_branch
                found_pull = client.create_pull(
                    owner,
                    repo,
                    head=head,
                    base=str(base),
                    title=str(p["title"]),
                    body=str(p["body"]),
                    draft=bool(p.get("draft", True)),
                )
            return found_pull
        if entry.kind == "reaction":
            target, content = str(p["target"]), str(p["content"])
            if target == "issue":
                client.add_issue_reaction(owner, repo, int(p["id"]), content)
            else:
                client.add_reaction(
                    owner, repo, int(p["id"]), content, review_comment=target == "review_comment"
                )
            return None, None
        if entry.kind == "labels":
            client.add_labels(owner, repo, int(p["number"]), [str(x) for x in p["labels"]])
            return None, None
        if entry.kind == "unlabel":
            client.remove_label(owner, repo, int(p["number"]), str(p["label"]))
            return None, None
        raise GitHubError(f"report {entry.report_id}: unknown kind {entry.kind!r}", 400)

    def _check_run(
        self,
        client: GitHubClient,
        owner: str,
        repo: str,
        entry: OutboxEntry,
        known: int | None,
        unsure: bool,
    ) -> int:
        p = entry.payload
        sha, name, external_id = str(p["sha"]), str(p["name"]), str(p["external_id"])
        fields: dict[str, Any] = {
            "status": p["status"],
            "conclusion": p.get("conclusion"),
            "output": p.get("output"),
            "details_url": p.get("details_url"),
            # When the run finished, not when GitHub at last took the report.
            "completed_at": datetime.fromisoformat(p["completed_at"])
            if p.get("completed_at")
            else None,
        }
        if known is None and unsure:
            known = client.find_check_run(owner, repo, sha, name, external_id)
            if known is not None:
                self.outbox.found(entry, known)
        if known is not None and unsure and _shows(client.get_check_run(owner, repo, known), p):
            # A create or an update whose answer never came had landed; sent again, GitHub would
            # add its annotations a second time.
            return known
        if known is not None:
            client.update_check_run(owner, repo, known, **fields)
            return known
        return client.create_check_run(owner, repo, sha, name, external_id=external_id, **fields)


def sending() -> bool:
    """Whether this thread is sending reports now (a report stored meanwhile waits its turn)."""
    return bool(getattr(_SENDING, "active", False))


def _shows(check_run: dict[str, Any], payload: dict[str, Any]) -> bool:
    """Whether GitHub's check run already shows what `payload` would set."""
    output, wanted = check_run.get("output") or {}, payload.get("output") or {}
    return (
        check_run.get("status") == payload.get("status")
        and check_run.get("conclusion") == payload.get("conclusion")
        and output.get("title") == wanted.get("title")
        and output.get("summary") == wanted.get("summary")
    )
