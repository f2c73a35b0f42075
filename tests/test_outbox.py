"""The outbox of GitHub reports: stored first, sent exactly once, in order, whatever GitHub says."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.github.auth import AppAuth
from bot.github.outbox import ReportSender, delivery_reports
from bot.github.service import GitHubService
from bot.logs import about_delivery
from bot.settings import Settings
from bot.states import PipelineKind, RunState
from bot.store import Pipeline, Run, Store
from bot.store.outbox import ReportState
from tests.github_fake import FakeGitHub

REPO = "octo/hello"
SHA = "ab" * 20
RESULT_SHA = "cd" * 20
LIVE = [RunState.PREPARING, RunState.BOOTING, RunState.AGENT, RunState.TESTING]
ORDER = ["queued", "preparing", "booting", "agent", "testing", "publishing"]


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout} s: {what}")


@pytest.fixture
def service(store_url: str, tmp_path: Path) -> Iterator[tuple[FakeGitHub, GitHubService]]:
    with FakeGitHub() as fake:
        fake.add_repo(REPO)
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=store_url,
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=["outbox-test-secret"],
            api_url=fake.base_url,
            web_url=fake.web_url,
            # Short backoff, so that bursts of 502 pass in a test's time; a rate limit still
            # waits as long as GitHub says.
            report_backoff_seconds=0.05,
            report_max_backoff_seconds=0.5,
        )
        store = Store(store_url)
        auth = AppAuth(fake.app_id, fake.private_key, fake.base_url)
        service = GitHubService(settings, store, auth, write_interval=0, edit_interval=0)
        try:
            yield fake, service
        finally:
            store.close()


def _pipeline(store: Store, kind: PipelineKind, number: int) -> Pipeline:
    return store.get_or_create_pipeline(
        repo=REPO,
        key=f"{kind.value}:{number}",
        kind=kind,
        branch=f"trimo/{number}-work",
        title=f"Work {number}",
        number=number,
        installation_id=1,
        head_repo=REPO if kind == PipelineKind.PULL else None,
    )


def _move(store: Store, run_id: int, state: RunState, **fields: object) -> Run:
    """Move a run on as its worker would (naming the state it expects, where the store's
    transitions are compare-and-set)."""
    if "expect" in inspect.signature(store.set_state).parameters:
        fields["expect"] = store.get_run(run_id).state
    return store.set_state(run_id, state, **fields)  # type: ignore[arg-type]


def _advance(service: GitHubService, run: Run, state: RunState) -> Run:
    moved = _move(service.store, run.id, state)
    service.reports.report(moved)
    return moved


def _senders(service: GitHubService, stop: threading.Event) -> list[threading.Thread]:
    # Two workers' senders on one store: leases keep them from sending a report twice.
    other = ReportSender(
        service.store,
        service.send_client,
        "another-worker",
        backoff=service.settings.report_backoff_seconds,
        max_backoff=service.settings.report_max_backoff_seconds,
    )
    other.pull_opened = service.reports.refresh
    threads = [
        threading.Thread(
            target=service.sender.run_forever, args=(stop, service.reports.sweep), daemon=True
        ),
        threading.Thread(target=other.run_forever, args=(stop,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    return threads


def test_bursts_of_502_and_429_lose_nothing_and_double_nothing(
    service: tuple[FakeGitHub, GitHubService],
) -> None:
    fake, svc = service
    store = svc.store
    for number in (1, 2, 3):
        fake.add_issue(REPO, title=f"Work {number}")
    # Bursts on every write Trimo makes, some after GitHub did the work (a 502 on the way back).
    reset = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 1)}
    limited = {"message": "API rate limit exceeded for installation ID 1."}
    fake.fail_next("POST", r"/issues/\d+/comments$", 502, times=2, apply=True)
    fake.fail_next("POST", r"/issues/\d+/comments$", 429, headers={"retry-after": "1"})
    fake.fail_next("PATCH", r"/issues/comments/\d+$", 502, times=3)
    fake.fail_next("PATCH", r"/issues/comments/\d+$", 502, times=2, apply=True)
    fake.fail_next("POST", r"/check-runs$", 502, apply=True)
    fake.fail_next("POST", r"/check-runs$", 403, headers=reset, body=limited)
    fake.fail_next("PATCH", r"/check-runs/\d+$", 429, headers={"retry-after": "1"}, times=2)
    fake.fail_next("PATCH", r"/check-runs/\d+$", 502, times=2, apply=True)
    fake.fail_next("POST", r"/pulls$", 502, apply=True)
    fake.fail_next("POST", r"/reactions$", 502, times=2, apply=True)

    stop = threading.Event()
    threads = _senders(svc, stop)
    try:
        pulls = [_pipeline(store, PipelineKind.PULL, n) for n in (1, 2)]
        issue = _pipeline(store, PipelineKind.ISSUE, 3)
        runs = [
            store.create_run(p.id, trigger="label", task="t", sender="alice", head_sha=SHA)
            for p in (*pulls, issue)
        ]
        for run in runs:
            svc.reports.queued(run, 1)
        for state in LIVE:
            for run in runs:
                _advance(svc, run, state)
        finals = {
            runs[0].id: (RunState.SUCCEEDED, "success"),
            runs[1].id: (RunState.FAILED, "failure"),
            runs[2].id: (RunState.SUCCEEDED, "success"),
        }
        store.update_run(runs[2].id, head_sha=RESULT_SHA, commits=1)
        for run in runs[:2]:
            store.update_run(run.id, tests_passed=3, tests_failed=int(run is runs[1]))
            _advance(svc, run, finals[run.id][0])
        _advance(svc, runs[2], RunState.SUCCEEDED)
        # A command answered while GitHub fails, and its delivery processed a second time (a
        # retry after a failure further on): one reply, one reaction.
        comment = fake.add_comment(REPO, 1, "/trimo status", user="alice")
        for _ in range(2):
            with about_delivery("delivery-7"), delivery_reports():
                client = svc.client(1, REPO)
                svc.commands.reply(client, REPO, 1, "Run 1: **succeeded**.")
                intent = type(
                    "I",
                    (),
                    {
                        "comment_id": comment["id"],
                        "comment_kind": "issue",
                        "repo": REPO,
                        "number": 1,
                    },
                )()
                svc.commands.react(client, intent)

        outbox = svc.sender.outbox

        def names_its_pull() -> bool:
            # The final comment is sent again once the pull request's create went through: the
            # sender thread queues that version after the round that opened it.
            marker = f"<!-- trimo:run={runs[2].id} -->"
            return any(
                marker in c["body"] and f"/pull/{n}" in c["body"]
                for c in fake.comments.values()
                for (_, n) in fake.pulls
            )

        wait_for(
            lambda: outbox.counts()[ReportState.PENDING] == 0 and names_its_pull(),
            60,
            "every report sent, the issue run's final comment naming its pull request",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)

    assert outbox.counts()[ReportState.FAILED] == 0
    for run in runs:
        marker = f"<!-- trimo:run={run.id} -->"
        tracking = [c for c in fake.comments.values() if marker in c["body"]]
        assert len(tracking) == 1, f"run {run.id}: {len(tracking)} tracking comments"
        history = fake.comment_history[tracking[0]["id"]]
        shown = [_phase(body) for body in history]
        # In order: GitHub never shows an earlier phase after a later one, and ends final.
        assert shown == sorted(shown), f"run {run.id}: phases out of order: {shown}"
        assert "Trimo run #" in history[-1] and shown[-1] == len(ORDER)
    for run in runs[:2]:
        (check,) = [c for c in fake.check_runs.values() if c["external_id"] == str(run.id)]
        assert check["head_sha"] == SHA
        assert (check["status"], check["conclusion"]) == ("completed", finals[run.id][1])
        statuses = [h["status"] for h in fake.check_run_history[check["id"]] if "status" in h]
        # A version that waited behind a failure is replaced by the next (coalesced), so the
        # first one GitHub saw may be in_progress already; never one older than the last.
        assert statuses[-1] == "completed" and statuses.count("completed") == 1
        rank = {"queued": 0, "in_progress": 1, "completed": 2}
        assert [rank[s] for s in statuses] == sorted(rank[s] for s in statuses)
    # The issue's run: one draft pull request (its create landed behind a 502), named in the
    # final comment, and one completed check run on the commit it pushed.
    assert len(fake.pulls) == 1
    ((_, number),) = fake.pulls.keys()
    tracking_issue = next(
        c for c in fake.comments.values() if f"<!-- trimo:run={runs[2].id} -->" in c["body"]
    )
    assert f"/pull/{number}" in tracking_issue["body"]
    (result,) = [c for c in fake.check_runs.values() if c["external_id"] == f"{runs[2].id}-result"]
    assert (result["head_sha"], result["conclusion"]) == (RESULT_SHA, "success")
    assert len(fake.check_runs) == 3
    replies = [c for c in fake.comments_on(REPO, 1) if "**succeeded**" in c["body"]]
    assert len(replies) == 1
    assert len(fake.reactions) == 1
    # The rate limits were waited out as GitHub asked (retry-after: 1), for the installation,
    # not hammered: nothing went to GitHub from a moment after each until a second had passed
    # (what was already on its way may arrive in that moment).
    limited = [r for r, status in fake.failed if status == 429]
    assert limited
    for answered in limited:
        sent_meanwhile = [r for r in fake.requests if 0.2 < r.at - answered.at < 0.9]
        assert sent_meanwhile == [], f"sent within the second after a 429: {sent_meanwhile}"


def test_a_run_the_reaper_finished_gets_its_final_report(
    service: tuple[FakeGitHub, GitHubService],
) -> None:
    fake, svc = service
    store = svc.store
    fake.add_issue(REPO, title="Work 1")
    pipeline = _pipeline(store, PipelineKind.PULL, 1)
    run = store.create_run(pipeline.id, trigger="label", task="t", sender="alice", head_sha=SHA)
    svc.reports.queued(run, 1)
    _advance(svc, run, RunState.AGENT)
    (check,) = fake.check_runs.values()
    assert check["status"] == "in_progress"
    # The worker died; the reaper (or `trimo runs cancel`) ends the run without reporting it.
    _move(store, run.id, RunState.ERROR, reason="the worker running it stopped")
    stop = threading.Event()
    threads = _senders(svc, stop)
    try:
        wait_for(lambda: fake.check_runs[check["id"]]["status"] == "completed", 20, "final report")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert fake.check_runs[check["id"]]["conclusion"] == "failure"
    (comment,) = fake.comments_on(REPO, 1)
    assert "stopped on an error" in comment["body"]
    assert "the worker running it stopped" in comment["body"]


def _phase(body: str) -> int:
    """How far along a tracking comment shows its run (the final heading counts as the end)."""
    heading = body.splitlines()[1]
    if ": " not in heading.split("Trimo run #", 1)[1]:
        return len(ORDER)
    return ORDER.index(heading.rsplit(": ", 1)[1])


def test_a_sender_that_dies_after_github_took_a_create_posts_nothing_twice(
    service: tuple[FakeGitHub, GitHubService],
) -> None:
    fake, svc = service
    store = svc.store
    fake.add_issue(REPO, title="Work 1")
    pipeline = _pipeline(store, PipelineKind.PULL, 1)
    run = store.create_run(pipeline.id, trigger="label", task="t", sender="alice", head_sha=SHA)

    class Died(Exception):
        pass

    def dies(*args: object, **kwargs: object) -> None:
        raise Died("the worker was killed between GitHub's answer and the store")

    # The first sender has GitHub's answer for the tracking comment, then dies before it can
    # store it; its lease runs out.
    doomed = ReportSender(store, svc.send_client, "doomed-worker", lease=timedelta(seconds=1))
    doomed.outbox.sent = dies  # type: ignore[method-assign]
    svc.sender = doomed
    with pytest.raises(Died):
        svc.reports.queued(run, 1)
    assert len(fake.comments_on(REPO, 1)) == 1 and fake.check_runs == {}
    # The next worker's sender takes the lane over once the lease expired: it finds the
    # comment by its marker instead of posting it again, then goes on in order.
    heir = ReportSender(store, svc.send_client, "next-worker", backoff=0.05)
    assert heir.send() == []  # still leased to the dead one
    time.sleep(1.1)
    taken = [e.report_id for e in heir.send()]
    assert taken == [f"run:{run.id}:comment", f"run:{run.id}:check"]
    assert heir.outbox.counts()[ReportState.PENDING] == 0
    (comment,) = fake.comments_on(REPO, 1)
    assert f"<!-- trimo:run={run.id} -->" in comment["body"]
    assert heir.outbox.get(f"run:{run.id}:comment").github_id == comment["id"]  # type: ignore[union-attr]
    (check,) = fake.check_runs.values()
    assert check["status"] == "queued"
    assert len(fake.requests_to("POST", r"/issues/1/comments$")) == 1
    assert len(fake.requests_to("POST", r"/check-runs$")) == 1


def test_a_write_github_is_slow_to_answer_keeps_its_lease_and_its_lane(
    service: tuple[FakeGitHub, GitHubService],
) -> None:
    """A lease as short as a run's: renewed while GitHub takes its time, so no other sender
    takes the report (or the lane behind it) and GitHub gets each create once; the lease
    lapses only once its sender is gone (tests/fleet_github.py kills one mid-write)."""
    fake, svc = service
    store = svc.store
    fake.add_issue(REPO, title="Work 1")
    pipeline = _pipeline(store, PipelineKind.PULL, 1)
    run = store.create_run(pipeline.id, trigger="label", task="t", sender="alice", head_sha=SHA)
    slow = ReportSender(store, svc.send_client, "slow-worker", lease=timedelta(seconds=0.6))
    other = ReportSender(store, svc.send_client, "other-worker", backoff=0.05)
    deliver = slow._deliver
    taken: list[str] = []

    def slowly(*args: Any, **kwargs: Any) -> Any:
        # While GitHub takes its time over each report (more than three leases), another
        # sender keeps asking for work: the report in flight and the lane behind it are not
        # its to take. (It asks only while a delivery is under way: between two, either
        # sender may rightly take the next report.)
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            taken.extend(e.report_id for e in other.send())
            time.sleep(0.1)
        return deliver(*args, **kwargs)

    slow._deliver = slowly  # type: ignore[method-assign]
    svc.sender = slow
    svc.reports.queued(run, 1)
    assert taken == []
    assert slow.outbox.counts()[ReportState.PENDING] == 0
    assert len(fake.requests_to("POST", r"/issues/1/comments$")) == 1
    assert len(fake.requests_to("POST", r"/check-runs$")) == 1
