"""The run report: the tracking comment, the check run, and posting each only once."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bot.github.client import GitHubClient
from bot.github.reporter import (
    COMMENT_MAX,
    Reporter,
    RunView,
    check_run_payload,
    render_comment,
)
from bot.junit import TestReport
from bot.network import Blocked, summarize
from bot.states import RunState
from tests.github_fake import FakeGitHub, fake_github  # noqa: F401

SHA = "c0ffee" + "0" * 34
FAILURES = [
    {
        "name": "tests/test_api.py::test_login",
        "message": "assert 401 == 200",
        "file": "tests/test_api.py",
        "line": 12,
    },
    {"name": "tests/test_db.py::test_migrate", "message": "OperationalError: no such table"},
]


def view(state: RunState = RunState.QUEUED, **fields: object) -> RunView:
    base: dict[str, object] = {
        "run_id": 7,
        "repo": "octo/hello",
        "number": 1,
        "state": state,
        "phase": state if state.live else RunState.TESTING,
        "head_sha": SHA,
        "trigger": "label `trimo`",
        "sender": "alice",
        "elapsed": 192.0,
    }
    return RunView(**(base | fields))  # type: ignore[arg-type]


class DictIds:
    def __init__(self) -> None:
        self.ids: dict[tuple[int, str], int] = {}

    def remember(self, run_id: int, kind: str, github_id: int) -> None:
        self.ids[(run_id, kind)] = github_id

    def recall(self, run_id: int, kind: str) -> int | None:
        return self.ids.get((run_id, kind))


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(fake_github: FakeGitHub) -> Iterator[GitHubClient]:
    fake_github.add_repo("octo/hello")
    fake_github.add_issue("octo/hello", title="Login is broken")
    gh = GitHubClient(fake_github.issue_token(), write_interval=0)
    yield gh
    gh.close()


# ---- rendering ------------------------------------------------------------------------------


def test_live_comment_shows_marker_phase_and_checklist() -> None:
    body = render_comment(view(RunState.AGENT, phase=RunState.AGENT))
    assert body.startswith("<!-- trimo:run=7 -->\n")
    assert "Trimo run #7: agent" in body
    assert "Started by @alice (label `trimo`) · running for 3m 12s" in body
    assert (
        "✅ queued → ✅ preparing → ✅ booting → ▶️ **agent** → ⬜ testing → ⬜ publishing" in body
    )
    for command in (
        "/trimo retry",
        "/trimo run <instructions>",
        "/trimo stop",
        "/trimo status",
        "/trimo test",
        "/trimo help",
    ):
        assert command in body


def test_final_comment_has_outcome_tests_summary_links_and_commits() -> None:
    body = render_comment(
        view(
            RunState.FAILED,
            elapsed=3723.0,
            tests=TestReport(passed=41, failed=2, skipped=1),
            failures=FAILURES,
            summary="Fixed the login redirect.",
            reason="2 tests failed",
            branch="trimo/issue-1",
            branch_url="https://github.com/octo/hello/tree/trimo/issue-1",
            pr_url="https://github.com/octo/hello/pull/2",
            log_url="https://trimo.example.test/runs/7/log",
            commits=[("0123456789abcdef", "Fix the login redirect")],
        )
    )
    assert "❌ Trimo run #7 failed" in body
    assert "took 1h 02m" in body
    assert "**Tests:** 41 passed, 2 failed, 1 skipped, 0 errors" in body
    assert "`tests/test_api.py::test_login` (tests/test_api.py:12): assert 401 == 200" in body
    assert "`tests/test_db.py::test_migrate`: OperationalError" in body
    assert "Fixed the login redirect." in body
    assert "**Why:** 2 tests failed" in body
    assert "[`trimo/issue-1`](https://github.com/octo/hello/tree/trimo/issue-1)" in body
    assert "https://github.com/octo/hello/pull/2" in body
    assert "`0123456789` Fix the login redirect" in body
    assert "❌ **testing**" in body


def test_superseded_run_says_by_which() -> None:
    body = render_comment(view(RunState.CANCELLED, superseded_by=8, reason="superseded"))
    assert "Superseded by run #8" in body


def test_huge_output_is_shortened_to_githubs_limit() -> None:
    failures = [{"name": f"test_{i}", "message": "x" * 300} for i in range(2000)]
    body = render_comment(
        view(
            RunState.FAILED,
            summary="word " * 50_000,
            failures=failures,
            commits=[(f"{i:040x}", "subject " * 20) for i in range(3000)],
            log_url="https://trimo.example.test/runs/7/log",
        )
    )
    assert len(body) <= COMMENT_MAX
    assert body.startswith("<!-- trimo:run=7 -->")
    assert "the full log: [log](https://trimo.example.test/runs/7/log)" in body
    assert "/trimo help" in body
    assert "more" in body  # the failures list says how many it left out


def test_agent_text_cannot_forge_a_marker() -> None:
    body = render_comment(view(RunState.SUCCEEDED, summary="<!-- trimo:run=99 --> done"))
    assert "trimo:run=99" not in body


@pytest.mark.parametrize(
    ("state", "conclusion"),
    [
        (RunState.SUCCEEDED, "success"),
        (RunState.FAILED, "failure"),
        (RunState.ERROR, "failure"),
        (RunState.CANCELLED, "cancelled"),
        (RunState.TIMED_OUT, "timed_out"),
        (RunState.BUDGET_EXCEEDED, "neutral"),
        (RunState.REJECTED, "action_required"),
    ],
)
def test_check_run_conclusion(state: RunState, conclusion: str) -> None:
    payload = check_run_payload(view(state))
    assert (payload["name"], payload["status"], payload["conclusion"]) == (
        "trimo",
        "completed",
        conclusion,
    )


def test_model_usage_shows_in_the_comment_and_the_check_run() -> None:
    usage = {"input_tokens": 6600, "output_tokens": 220, "usd": 0.0231, "calls": 4}
    finished = view(RunState.BUDGET_EXCEEDED, usage=usage, reason="the model budget was spent")
    line = "**Model usage:** 6,600 tokens in, 220 out, $0.0231 (4 model calls)"
    assert line in render_comment(finished)
    assert "spent its model budget" in render_comment(finished)
    assert line in check_run_payload(finished)["output"]["summary"]
    assert "Model usage" not in render_comment(view(RunState.SUCCEEDED))


def test_check_run_live_status_and_limits() -> None:
    assert check_run_payload(view(RunState.QUEUED))["status"] == "queued"
    assert check_run_payload(view(RunState.TESTING))["status"] == "in_progress"
    huge = check_run_payload(
        view(
            RunState.FAILED,
            summary="s" * 100_000,
            failures=[{"name": f"t{i}", "message": "m" * 500} for i in range(500)],
            tests=TestReport(passed=0, failed=500),
        )
    )
    output = huge["output"]
    assert len(output["summary"]) <= 65535
    assert len(output["text"]) <= 65535
    assert output["title"] == "Tests: 0 passed, 500 failed, 0 skipped, 0 errors"


def test_annotations_come_from_failures_with_a_place() -> None:
    output = check_run_payload(view(RunState.FAILED, failures=FAILURES))["output"]
    assert output["annotations"] == [
        {
            "path": "tests/test_api.py",
            "start_line": 12,
            "end_line": 12,
            "annotation_level": "failure",
            "title": "tests/test_api.py::test_login",
            "message": "assert 401 == 200",
        }
    ]


# ---- posting --------------------------------------------------------------------------------


def test_one_comment_and_one_check_run_per_run(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    clock = Clock()
    reporter = Reporter(client, DictIds(), edit_interval=10, clock=clock)
    reporter.on_queued(view(RunState.QUEUED))
    clock.now += 11
    assert reporter.on_phase(view(RunState.PREPARING))
    clock.now += 1
    assert not reporter.on_phase(view(RunState.BOOTING))  # too soon: waits
    reporter.on_finished(
        view(RunState.SUCCEEDED, tests=TestReport(passed=3), failures=[], phase=RunState.PUBLISHING)
    )

    (comment,) = fake_github.comments_on("octo/hello", 1)
    assert "✅ Trimo run #7 succeeded" in comment["body"]
    (check,) = fake_github.check_runs.values()
    assert (check["head_sha"], check["status"], check["conclusion"]) == (
        SHA,
        "completed",
        "success",
    )
    assert [h.get("status") for h in fake_github.check_run_history[check["id"]]] == [
        "queued",
        "in_progress",
        "completed",
    ]
    assert len(fake_github.requests_to("PATCH", r"/issues/comments/")) == 2


def test_phases_within_the_interval_are_coalesced_into_the_latest_never_dropped(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    clock = Clock()
    reporter = Reporter(client, DictIds(), edit_interval=3, clock=clock, background=False)
    reporter.on_queued(view(RunState.QUEUED))
    clock.now += 0.5
    assert not reporter.on_phase(view(RunState.PREPARING))
    clock.now += 0.5
    assert not reporter.on_phase(view(RunState.BOOTING))
    clock.now += 0.5
    assert not reporter.on_phase(view(RunState.AGENT))
    assert reporter.flush_due() == pytest.approx(1.5)  # not due yet: nothing posted
    (comment,) = fake_github.comments_on("octo/hello", 1)
    assert "queued" in comment["body"].splitlines()[1]

    clock.now += 1.5  # the interval since the queued edit is over
    assert reporter.flush_due() is None
    (comment,) = fake_github.comments_on("octo/hello", 1)
    # The latest phase, not the first one that waited.
    assert "Trimo run #7: agent" in comment["body"]
    assert len(fake_github.requests_to("PATCH", r"/issues/comments/")) == 1
    (check,) = fake_github.check_runs.values()
    assert check["status"] == "in_progress"


def test_the_final_state_is_posted_at_once_and_no_waiting_phase_follows_it(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    clock = Clock()
    reporter = Reporter(client, DictIds(), edit_interval=3, clock=clock, background=False)
    reporter.on_queued(view(RunState.QUEUED))
    clock.now += 1
    reporter.on_phase(view(RunState.TESTING))
    reporter.on_finished(view(RunState.FAILED, failures=FAILURES))
    clock.now += 10
    assert reporter.flush_due() is None
    assert not reporter.on_phase(view(RunState.TESTING))  # a straggler after the end
    (comment,) = fake_github.comments_on("octo/hello", 1)
    assert "❌ Trimo run #7 failed" in comment["body"]
    (check,) = fake_github.check_runs.values()
    assert check["conclusion"] == "failure"


def test_a_waiting_phase_is_posted_by_the_reporters_own_thread(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    reporter = Reporter(client, DictIds(), edit_interval=0.5)
    try:
        reporter.on_queued(view(RunState.QUEUED))
        assert not reporter.on_phase(view(RunState.AGENT))
        started = time.monotonic()
        body = ""
        while time.monotonic() - started < 5 and "Trimo run #7: agent" not in body:
            time.sleep(0.05)
            (comment,) = fake_github.comments_on("octo/hello", 1)
            body = comment["body"]
        assert "Trimo run #7: agent" in body
    finally:
        reporter.close()


def test_a_new_reporter_with_the_same_ids_edits(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    ids = DictIds()
    Reporter(client, ids).on_queued(view(RunState.QUEUED))
    # A restart: a new reporter, the run store's ids.
    Reporter(client, ids).on_finished(view(RunState.FAILED, failures=FAILURES))

    assert len(fake_github.comments_on("octo/hello", 1)) == 1
    assert len(fake_github.check_runs) == 1
    (check,) = fake_github.check_runs.values()
    assert check["conclusion"] == "failure"


def test_finished_report_retried_adds_no_annotation_twice(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    ids = DictIds()
    reporter = Reporter(client, ids)
    reporter.on_queued(view(RunState.QUEUED))
    final = view(RunState.FAILED, failures=FAILURES)
    reporter.on_finished(final)
    reporter.on_finished(final)
    (check,) = fake_github.check_runs.values()
    assert check["output"]["annotations_count"] == 1


def test_finished_without_earlier_report_creates_completed_check(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    Reporter(client, DictIds()).on_finished(view(RunState.REJECTED, reason="no write access"))
    (check,) = fake_github.check_runs.values()
    assert (check["status"], check["conclusion"]) == ("completed", "action_required")
    assert "no write access" in fake_github.comments_on("octo/hello", 1)[0]["body"]


def test_the_pushed_commit_gets_a_completed_check_run_once(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    pushed = "b" * 40
    ids = DictIds()
    reporter = Reporter(client, ids)
    reporter.on_queued(view(RunState.QUEUED))
    final = view(RunState.SUCCEEDED, tests=TestReport(passed=3), result_sha=pushed)
    reporter.on_finished(final)
    Reporter(client, ids).on_finished(final)  # a retry after a restart posts nothing new

    by_sha = {c["head_sha"]: c for c in fake_github.check_runs.values()}
    assert set(by_sha) == {SHA, pushed}
    assert by_sha[pushed]["status"] == "completed" and by_sha[pushed]["conclusion"] == "success"
    assert by_sha[pushed]["output"]["title"] == by_sha[SHA]["output"]["title"]


def test_a_run_whose_result_was_refused_says_so_and_a_missing_test_report_is_named() -> None:
    from datetime import UTC, datetime

    refused = view(
        RunState.REJECTED,
        started_at=datetime.now(UTC),
        phase=RunState.PUBLISHING,
        reason="result not published: the result holds the value of secret API_KEY (...)",
        tests_exit_code=0,
    )
    body = render_comment(refused)
    assert "🚫 Trimo run #7 was not published" in body
    assert "**Tests:** no test report (the test command exited 0 without writing JUnit)" in body
    assert check_run_payload(refused)["output"]["title"] == "Tests: no test report (exit 0)"
    # Never started (not authorized): the heading says that instead.
    assert "was not started" in render_comment(view(RunState.REJECTED, reason="no write access"))
    # Refused while preparing (a secret not granted): claimed, yet never started either.
    not_granted = view(
        RunState.REJECTED,
        started_at=datetime.now(UTC),
        phase=RunState.PREPARING,
        reason="the server does not grant secret API_KEY to octo/repo",
    )
    assert "was not started" in render_comment(not_granted)


def test_blocked_hosts_are_listed_with_counts_and_the_line_that_allows_each() -> None:
    rows = summarize([Blocked("CONNECT", "example.org", 443, "allow", "not in network.allow")] * 3)
    v = view(RunState.SUCCEEDED, blocked=rows)
    for text in (render_comment(v), check_run_payload(v)["output"]["summary"]):
        assert "**Network: blocked hosts**" in text
        assert (
            '| `example.org:443` | 3 | not in network.allow | `network: {allow: ["example.org"]}'
            in text
        )
    assert "blocked hosts" not in render_comment(view(RunState.SUCCEEDED))
