"""A run's report on GitHub: the tracking comment and the check run, rendered and kept current."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from bot.gateway.policy import usage_line
from bot.github.client import GitHubClient
from bot.junit import TestReport
from bot.network import blocked_markdown
from bot.states import PHASES, RunState
from bot.store.outbox import Report

if TYPE_CHECKING:
    from bot.github.outbox import ReportSender

COMMENT_MAX = 65536
CHECK_TEXT_MAX = 65535
ANNOTATION_MESSAGE_MAX = 64 * 1024
# Beyond this many, annotations only cost write requests (50 per request, 1 s apart).
ANNOTATIONS_MAX = 200
CHECK_NAME = "trimo"
# The completed check run on the commit a run pushed (kind under which its id is kept).
RESULT_CHECK = "check_run_result"
TAIL_LINES = 30
# Live edits of one run at most this often: a few seconds keeps the comment current without
# spending the installation's write budget (writes go one at a time, 1 s apart).
EDIT_INTERVAL_SECONDS = 3.0
IDLE_WAIT_SECONDS = 5.0
TAIL_LINE_MAX = 300

MARKER = "<!-- trimo:run={run_id} -->"
LIVE_HEADING = "### {icon} Trimo run #{run_id}: {phase}"
FINAL_HEADING = "### {icon} Trimo run #{run_id} {outcome}"
STARTED_BY = "Started by @{sender} ({trigger})"
TRUNCATED = "*Output shortened to fit GitHub's limit; the full log: {where}.*"
SUPERSEDED = "Superseded by run #{run_id}, which carries on the work of this one."
PUBLISH_REFUSED = "was not published"
NO_TEST_REPORT = "no test report (the test command exited {code} without writing JUnit)"
AGENT_SUMMARY = "**Summary from the agent** (its own words, not checked by Trimo):"
NOT_PUSHED = "**Not pushed:** {why}. The commits are offered as a patch; apply it with `git am`."
PATCH_KEPT = "The patch is kept with the run on the Trimo host: `{path}`."
COMMANDS = (
    "<details><summary>Commands</summary>\n\n"
    "Comment a line starting with:\n\n"
    "- `/trimo retry`: run the same task again\n"
    "- `/trimo run <instructions>`: run the agent with more instructions\n"
    "- `/trimo stop`: stop the live run\n"
    "- `/trimo status`: show the state of the run\n"
    "- `/trimo test`: run the tests only, without the agent\n"
    "- `/trimo help`: this list\n\n"
    "</details>"
)
OUTCOMES = {
    RunState.SUCCEEDED: ("✅", "succeeded"),
    RunState.FAILED: ("❌", "failed"),
    RunState.ERROR: ("💥", "stopped on an error"),
    RunState.CANCELLED: ("⏹️", "was cancelled"),
    RunState.TIMED_OUT: ("⌛", "timed out"),
    RunState.BUDGET_EXCEEDED: ("💸", "spent its model budget"),
    RunState.REJECTED: ("🚫", "was not started"),
}
CONCLUSIONS = {
    RunState.SUCCEEDED: "success",
    RunState.FAILED: "failure",
    RunState.ERROR: "failure",
    RunState.CANCELLED: "cancelled",
    RunState.TIMED_OUT: "timed_out",
    # The agent stopped short of its task: the work so far is on the branch, unfinished.
    RunState.BUDGET_EXCEEDED: "neutral",
    # Someone with write access has to approve or trigger it: that is GitHub's "action required".
    RunState.REJECTED: "action_required",
}
log = logging.getLogger(__name__)
_ANY_MARKER = re.compile(r"<!--\s*trimo:[^>]*-->")


@dataclass
class RunView:
    """What the report shows of a run; the engine fills it from the run store."""

    run_id: int
    repo: str  # "owner/name"
    number: int  # the issue or pull request
    state: RunState
    phase: RunState = RunState.QUEUED  # the last phase reached, also once finished
    head_sha: str | None = None  # the check run goes on this commit; none without it
    # The commit the run pushed and tested, when it differs from head_sha: a completed check run
    # goes there too, so the branch's pull request shows the result.
    result_sha: str | None = None
    # The last lines of what failed (a build, preboot, the agent or the tests), masked.
    tail: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    elapsed: float | None = None  # seconds
    trigger: str = ""
    sender: str | None = None
    branch: str | None = None
    branch_url: str | None = None
    pr_url: str | None = None
    tests: TestReport | None = None  # the totals; details of failures are in `failures`
    # The test command's exit code when it ran: with `tests` None, it wrote no JUnit report.
    tests_exit_code: int | None = None
    # Each: name, message, and when known file and line.
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: str | None = None
    reason: str | None = None
    superseded_by: int | None = None
    log_url: str | None = None
    commits: list[tuple[str, str]] = field(default_factory=list)  # (sha, subject)
    # Hosts the egress proxy refused (bot.network.summarize): host, port, count, reason, fix.
    blocked: list[dict[str, Any]] = field(default_factory=list)
    # Model usage metered by the run's gateway: input_tokens, output_tokens, usd, calls.
    usage: dict[str, Any] | None = None
    # Why the commits were not pushed (a fork's PR that allows no edits, a refused push), the
    # `git am`-able patch when small enough to show, and where it is kept with the run.
    not_pushed: str | None = None
    patch: str | None = None
    patch_path: str | None = None


class IdStore(Protocol):
    """Where the ids of what a run posted are kept, so nothing is ever posted twice."""

    def remember(self, run_id: int, kind: str, github_id: int) -> None: ...

    def recall(self, run_id: int, kind: str) -> int | None: ...


# ---- rendering ---------------------------------------------------------------------------------


def render_comment(view: RunView) -> str:
    """The tracking comment, at most 65,536 characters whatever the run produced."""
    summary = _clean(view.summary or "")
    failures = list(view.failures)
    commits = list(view.commits)
    body = _comment(view, summary, failures, commits, shortened=False)
    if len(body) <= COMMENT_MAX:
        return body
    # Shorten what is longest and least needed first: the summary, then the failures, commits.
    fixed = len(_comment(view, "", [], [], shortened=True))
    summary = _cut(summary, max(COMMENT_MAX - fixed - 200, 0) // 2)
    while failures and len(_comment(view, summary, failures, [], shortened=True)) > COMMENT_MAX:
        failures = failures[: len(failures) // 2]
    while commits and len(_comment(view, summary, failures, commits, shortened=True)) > COMMENT_MAX:
        commits = commits[: len(commits) // 2]
    body = _comment(view, summary, failures, commits, shortened=True)
    return body if len(body) <= COMMENT_MAX else _cut(body, COMMENT_MAX)


def _comment(
    view: RunView,
    summary: str,
    failures: list[dict[str, Any]],
    commits: list[tuple[str, str]],
    *,
    shortened: bool,
) -> str:
    lines = [MARKER.format(run_id=view.run_id)]
    if view.state.finished:
        icon, outcome = _outcome(view)
        lines.append(FINAL_HEADING.format(icon=icon, run_id=view.run_id, outcome=outcome))
    else:
        icon = "⏳" if view.state == RunState.QUEUED else "🔄"
        lines.append(LIVE_HEADING.format(icon=icon, run_id=view.run_id, phase=view.state.value))
    lines.append(_byline(view))
    lines += ["", _checklist(view), ""]
    if view.reason:
        lines += [f"**Why:** {_clean(view.reason)}", ""]
    if view.tail:
        # Fenced so that nothing in the output renders, pings or closes the block early.
        fence = "`" * max(3, _longest_backtick_run(view.tail) + 1)
        shown = [_cut(line, TAIL_LINE_MAX) for line in view.tail[-TAIL_LINES:]]
        lines += [
            "<details><summary>Last lines</summary>",
            "",
            fence,
            *shown,
            fence,
            "",
            "</details>",
            "",
        ]
    if view.superseded_by is not None:
        lines += [SUPERSEDED.format(run_id=view.superseded_by), ""]
    if view.tests is not None:
        lines += [f"**Tests:** {_totals(view.tests)}", ""]
    elif view.tests_exit_code is not None:
        lines += [f"**Tests:** {NO_TEST_REPORT.format(code=view.tests_exit_code)}", ""]
    usage = usage_line(view.usage)
    if usage:
        lines += [f"**Model usage:** {usage}", ""]
    if failures:
        lines.append("**Failing tests:**")
        lines += [f"- {_failure_line(f)}" for f in failures]
        if len(failures) < len(view.failures):
            lines.append(f"- … and {len(view.failures) - len(failures)} more")
        lines.append("")
    if view.blocked:
        lines += [*blocked_markdown(view.blocked), ""]
    if summary:
        lines += [AGENT_SUMMARY, "", summary, ""]
    links = _links(view)
    if links:
        lines += [links, ""]
    if commits:
        lines.append("**Commits:**")
        lines += [f"- `{sha[:10]}` {_clean(subject)}" for sha, subject in commits]
        if len(commits) < len(view.commits):
            lines.append(f"- … and {len(view.commits) - len(commits)} more")
        lines.append("")
    if view.not_pushed:
        lines += [NOT_PUSHED.format(why=_clean(view.not_pushed)), ""]
        if view.patch and not shortened:
            patch = view.patch.splitlines()
            fence = "`" * max(3, _longest_backtick_run(patch) + 1)
            lines += [
                "<details><summary>Patch (<code>git am</code>)</summary>",
                "",
                fence + "diff",
                *patch,
                fence,
                "",
                "</details>",
                "",
            ]
        elif view.patch_path:
            lines += [PATCH_KEPT.format(path=view.patch_path), ""]
    if shortened:
        where = (
            f"[log]({view.log_url})"
            if view.log_url
            else f"`trimo runs logs {view.run_id}` on the Trimo host"
        )
        lines += [TRUNCATED.format(where=where), ""]
    lines.append(COMMANDS)
    return "\n".join(lines)


def _outcome(view: RunView) -> tuple[str, str]:
    started = view.started_at is not None and view.phase not in (
        RunState.QUEUED,
        RunState.PREPARING,
    )
    if view.state == RunState.REJECTED and started:
        # It ran, and Trimo refused what it made (a secret's value in its commits); refused
        # while preparing (a secret not granted, a fork's head moved), it never started.
        return OUTCOMES[view.state][0], PUBLISH_REFUSED
    return OUTCOMES[view.state]


def _totals(tests: TestReport) -> str:
    return (
        f"{tests.passed} passed, {tests.failed} failed, {tests.skipped} skipped, "
        f"{tests.errors} errors"
    )


def _byline(view: RunView) -> str:
    parts = []
    if view.sender:
        parts.append(STARTED_BY.format(sender=view.sender, trigger=view.trigger or "label"))
    if view.elapsed is not None:
        took = "took" if view.state.finished else "running for"
        parts.append(f"{took} {_duration(view.elapsed)}")
    return " · ".join(parts)


def _checklist(view: RunView) -> str:
    reached = PHASES.index(view.phase) if view.phase in PHASES else 0
    succeeded = view.state == RunState.SUCCEEDED
    lines = []
    for index, phase in enumerate(PHASES):
        if succeeded or index < reached:
            mark = "✅"
        elif index == reached:
            mark = "❌" if view.state.finished else "▶️"
        else:
            mark = "⬜"
        name = f"**{phase.value}**" if index == reached and not succeeded else phase.value
        lines.append(f"{mark} {name}")
    return " → ".join(lines)


def _links(view: RunView) -> str:
    parts = []
    if view.branch:
        branch = f"`{view.branch}`"
        parts.append(f"**Branch:** [{branch}]({view.branch_url})" if view.branch_url else branch)
    if view.pr_url:
        parts.append(f"**Pull request:** {view.pr_url}")
    if view.log_url:
        parts.append(f"**Run page:** [live log and results]({view.log_url})")
    return " · ".join(parts)


def _failure_line(failure: dict[str, Any]) -> str:
    name = _test_name(failure)
    message = _clean(str(failure.get("message") or "")).strip().splitlines()
    where = _location(failure)
    text = f"`{name}`" + (f" ({where})" if where else "")
    return text + (f": {_cut(message[0], 200)}" if message else "")


def _test_name(failure: dict[str, Any]) -> str:
    # A backtick in a test id would end the code span around it.
    return str(failure.get("name", "?")).replace("`", "'")


def _location(failure: dict[str, Any]) -> str:
    file, line = failure.get("file"), failure.get("line")
    if not file:
        return ""
    return f"{file}:{line}" if line else str(file)


def _duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _clean(text: str) -> str:
    # Text from the agent or the tests must not pass for Trimo's own marker.
    return _ANY_MARKER.sub("", text)


def _longest_backtick_run(lines: list[str]) -> int:
    return max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def check_run_payload(view: RunView) -> dict[str, Any]:
    """The check run's fields for create/update: name, status, conclusion and output."""
    payload: dict[str, Any] = {"name": CHECK_NAME, "external_id": str(view.run_id)}
    if view.state.finished:
        payload["status"] = "completed"
        payload["conclusion"] = CONCLUSIONS[view.state]
    else:
        payload["status"] = "queued" if view.state == RunState.QUEUED else "in_progress"
    if view.log_url:
        payload["details_url"] = view.log_url
    output: dict[str, Any] = {
        "title": _check_title(view),
        "summary": _cut(_check_summary(view), CHECK_TEXT_MAX),
    }
    text = _check_text(view)
    if text:
        output["text"] = _cut(text, CHECK_TEXT_MAX)
    annotations = _annotations(view)
    if annotations:
        output["annotations"] = annotations
    payload["output"] = output
    return payload


def _check_title(view: RunView) -> str:
    if view.tests is not None:
        return f"Tests: {_totals(view.tests)}"
    if view.tests_exit_code is not None:
        return f"Tests: no test report (exit {view.tests_exit_code})"
    if view.state.finished:
        return f"Run #{view.run_id} {_outcome(view)[1]}"
    return f"Run #{view.run_id}: {view.state.value}"


def _check_summary(view: RunView) -> str:
    lines = [_byline(view) or f"Run #{view.run_id}", "", _checklist(view)]
    if view.reason:
        lines += ["", f"**Why:** {_clean(view.reason)}"]
    if view.blocked:
        lines += ["", *blocked_markdown(view.blocked)]
    links = _links(view)
    if links:
        lines += ["", links]
    usage = usage_line(view.usage)
    if usage:
        lines += ["", f"**Model usage:** {usage}"]
    if view.summary:
        lines += ["", AGENT_SUMMARY, "", _clean(view.summary)]
    return "\n".join(lines)


def _check_text(view: RunView) -> str:
    blocks = []
    for failure in view.failures:
        where = _location(failure)
        header = f"#### `{_test_name(failure)}`"
        blocks.append(header + (f" ({where})" if where else ""))
        message = str(failure.get("message") or "").strip()
        if message:
            blocks.append("```\n" + _cut(message, 4000).replace("```", "'''") + "\n```")
    return "\n\n".join(blocks)


def _annotations(view: RunView) -> list[dict[str, Any]]:
    annotations = []
    for failure in view.failures:
        if not failure.get("file") or not failure.get("line"):
            continue
        line = int(failure["line"])
        annotations.append(
            {
                "path": str(failure["file"]),
                "start_line": line,
                "end_line": line,
                "annotation_level": "failure",
                "title": _cut(str(failure.get("name", "test failed")), 255),
                "message": _cut(str(failure.get("message") or "failed"), ANNOTATION_MESSAGE_MAX),
            }
        )
    return annotations[:ANNOTATIONS_MAX]


# ---- the stateful side -------------------------------------------------------------------------


class Reporter:
    """Posts a run's comment and check run once, then edits them.

    Live edits of one run are coalesced, never dropped: a phase change that comes less than
    `edit_interval` after the last edit is kept as the run's pending view and posted when the
    interval is over (by `flush_due`, which a background thread calls), so no phase is shown for
    longer than `edit_interval` after it ended. The final state is always posted at once.

    With a `sender`, each post is stored in the outbox first (one report per object, coalesced:
    the latest version wins) and the sender delivers it, now or after GitHub let it; without
    one (a test of rendering and timing), the client is called directly.
    """

    def __init__(
        self,
        client: GitHubClient,
        ids: IdStore,
        *,
        edit_interval: float = EDIT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        sender: ReportSender | None = None,
        installation_id: int = 0,
    ) -> None:
        self._client = client
        self._sender = sender
        self._installation_id = installation_id
        self._ids = ids
        self.edit_interval = edit_interval
        self._clock = clock
        self._last_edit: dict[int, float] = {}
        self._pending: dict[int, RunView] = {}
        self._finished: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # One report of a run at a time: a deferred edit must never land after the final one.
        self._run_locks: dict[int, threading.Lock] = {}
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._background = background

    def on_queued(self, view: RunView) -> None:
        with self._run_lock(view.run_id):
            self._publish(view)

    def on_phase(self, view: RunView) -> bool:
        """Show the new phase now, or once `edit_interval` has passed since the last edit.

        True when it was posted now, False when it waits (a later phase replaces it)."""
        with self._lock:
            if view.run_id in self._finished:
                return False
            last = self._last_edit.get(view.run_id)
            if last is not None and self._clock() - last < self.edit_interval:
                self._pending[view.run_id] = view
                self._start_flusher()
                self._wake.notify_all()
                return False
            self._pending.pop(view.run_id, None)
        with self._run_lock(view.run_id):
            self._publish(view)
        return True

    def on_finished(self, view: RunView) -> None:
        with self._lock:
            self._finished.add(view.run_id)
            self._pending.pop(view.run_id, None)
        with self._run_lock(view.run_id):
            self._publish(view)
        with self._lock:
            self._last_edit.pop(view.run_id, None)
            self._run_locks.pop(view.run_id, None)

    def pending(self) -> dict[int, RunView]:
        """The views waiting for their interval to pass, by run id."""
        with self._lock:
            return dict(self._pending)

    def flush_due(self) -> float | None:
        """Post every pending view whose interval has passed; seconds until the next is due."""
        while True:
            with self._lock:
                now = self._clock()
                due = [
                    run_id
                    for run_id in self._pending
                    if now - self._last_edit.get(run_id, float("-inf")) >= self.edit_interval
                ]
                if not due:
                    waits = [
                        self._last_edit.get(run_id, now) + self.edit_interval - now
                        for run_id in self._pending
                    ]
                    return max(min(waits), 0.0) if waits else None
                run_id = due[0]
                view = self._pending.pop(run_id)
            try:
                with self._run_lock(run_id):
                    # The final report may have gone out while this one waited for the lock.
                    if run_id in self._finished:
                        continue
                    self._publish(view)
            except Exception:
                log.exception("run %s: deferred report failed; retrying", run_id)
                with self._lock:
                    self._pending.setdefault(run_id, view)
                    self._last_edit[run_id] = self._clock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _run_lock(self, run_id: int) -> threading.Lock:
        with self._lock:
            return self._run_locks.setdefault(run_id, threading.Lock())

    def _start_flusher(self) -> None:
        # Called with self._lock held.
        if not self._background or self._flusher is not None:
            return
        self._flusher = threading.Thread(
            target=self._flush_forever, name="trimo-report", daemon=True
        )
        self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            self.flush_due()
            with self._lock:
                if self._closed:
                    return
                # Computed under the lock that on_phase notifies under: a view that came in
                # since flush_due looked is waited for, not slept past.
                now = self._clock()
                waits = [
                    self._last_edit.get(run_id, now) + self.edit_interval - now
                    for run_id in self._pending
                ]
                if waits:
                    self._wake.wait(max(min(waits), 0.01))
                else:
                    self._wake.wait(IDLE_WAIT_SECONDS)

    def _publish(self, view: RunView) -> None:
        if self._sender is not None:
            self._store(view, self._sender)
        else:
            self._post(view)
        with self._lock:
            self._last_edit[view.run_id] = self._clock()

    def _store(self, view: RunView, sender: ReportSender) -> None:
        lane, final = f"run:{view.run_id}", view.state.finished

        def report(name: str, kind: str, payload: dict[str, Any], coalesce: bool) -> Report:
            return Report(
                report_id=f"{lane}:{name}",
                lane=lane,
                kind=kind,
                installation_id=self._installation_id,
                repo=view.repo,
                payload=payload,
                run_id=view.run_id,
                coalesce=coalesce,
                final=final or not coalesce,
            )

        body = render_comment(view)
        reports = [
            report(
                "comment",
                "comment",
                {"number": view.number, "body": body, "posted": "comment"},
                True,
            )
        ]
        check = check_run_payload(view)
        if final and view.finished_at is not None:
            check["completed_at"] = view.finished_at.isoformat()
        if view.head_sha:
            payload = {"sha": view.head_sha, "posted": "check_run", **check}
            reports.append(report("check", "check_run", payload, True))
        if final and view.result_sha and view.result_sha != view.head_sha:
            external_id = f"{check['external_id']}-result"
            payload = {"sha": view.result_sha, "posted": RESULT_CHECK, **check}
            reports.append(
                report("result-check", "check_run", payload | {"external_id": external_id}, False)
            )
        sender.put_all(reports, lane)

    def _post(self, view: RunView) -> None:
        owner, repo = view.repo.split("/", 1)
        body = render_comment(view)
        comment_id = self._ids.recall(view.run_id, "comment")
        if comment_id is None:
            comment_id, _ = self._client.create_comment(owner, repo, view.number, body)
            self._ids.remember(view.run_id, "comment", comment_id)
        else:
            self._client.update_comment(owner, repo, comment_id, body)
        if view.head_sha:
            self._publish_check(owner, repo, view)
        if view.state.finished and view.result_sha and view.result_sha != view.head_sha:
            self._publish_result_check(owner, repo, view)

    def _publish_result_check(self, owner: str, repo: str, view: RunView) -> None:
        if self._ids.recall(view.run_id, RESULT_CHECK) is None:
            payload = check_run_payload(view)
            check_id = self._create_check(owner, repo, str(view.result_sha), payload, "-result")
            self._ids.remember(view.run_id, RESULT_CHECK, check_id)

    def _create_check(
        self, owner: str, repo: str, sha: str, payload: dict[str, Any], suffix: str = ""
    ) -> int:
        return self._client.create_check_run(
            owner,
            repo,
            sha,
            payload["name"],
            status=payload["status"],
            conclusion=payload.get("conclusion"),
            output=payload["output"],
            details_url=payload.get("details_url"),
            external_id=payload["external_id"] + suffix,
        )

    def _publish_check(self, owner: str, repo: str, view: RunView) -> None:
        # GitHub appends annotations on every update: once completed, the check run is left alone.
        if self._ids.recall(view.run_id, "check_run_completed") is not None:
            return
        payload = check_run_payload(view)
        check_id = self._ids.recall(view.run_id, "check_run")
        if check_id is None:
            check_id = self._create_check(owner, repo, str(view.head_sha), payload)
            self._ids.remember(view.run_id, "check_run", check_id)
        else:
            self._client.update_check_run(
                owner,
                repo,
                check_id,
                status=payload["status"],
                conclusion=payload.get("conclusion"),
                output=payload["output"],
                details_url=payload.get("details_url"),
            )
        if view.state.finished:
            self._ids.remember(view.run_id, "check_run_completed", check_id)
