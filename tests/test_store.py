"""The run store: migrations, the run queue, events, webhook deliveries, installations."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy.exc
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from bot.errors import NoSuchRunError
from bot.states import LIVE, PipelineKind, RunMode, RunState
from bot.store import (
    MIGRATIONS_DIR,
    Base,
    DeliveryState,
    Installation,
    Pipeline,
    Store,
    schema_objects_of,
)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    try:
        yield s
    finally:
        s.close()


def _pipeline(store: Store, key: str = "issue:12") -> Pipeline:
    return store.get_or_create_pipeline(
        repo="octo/app",
        key=key,
        kind=PipelineKind.ISSUE,
        branch=f"trimo/{key.replace(':', '-')}",
        title="Fix the login page",
        number=12,
        installation_id=99,
    )


def _head() -> str | None:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


# -- schema ------------------------------------------------------------------------------------


def test_a_fresh_database_is_migrated_to_head_and_reopening_is_a_no_op(store_url: str) -> None:
    with Store(store_url) as first:
        assert first.schema_version() == _head()
        run = first.create_run(_pipeline(first).id, trigger="label", task="do it")
    with Store(store_url) as second:
        assert second.schema_version() == _head()
        second.migrate()
        assert second.get_run(run.id).task == "do it"


def test_the_migrations_create_exactly_the_schema_the_models_describe(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": schema_objects_of(conn.dialect.name)}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    with Store(Store.sqlite_url(tmp_path / "nested" / "dir")) as store:
        assert (tmp_path / "nested" / "dir" / "trimo.db").is_file()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 5000


def test_a_run_field_without_its_column_is_refused_when_the_store_loads() -> None:
    from dataclasses import dataclass

    from bot.store.models import _reader
    from bot.store.records import PipelineRecord

    @dataclass(frozen=True)
    class Wider:
        id: int
        colour: str

    with pytest.raises(TypeError, match=r"fields without a column \['colour'\]"):
        _reader(Wider, PipelineRecord, {}, {})


# -- pipelines ---------------------------------------------------------------------------------


def test_a_pipeline_is_created_once_per_repository_and_key(store: Store) -> None:
    first = _pipeline(store)
    again = store.get_or_create_pipeline(
        repo="octo/app",
        key="issue:12",
        kind=PipelineKind.ISSUE,
        branch="another-branch",
        title="Fix the login page (renamed)",
    )
    other_repo = store.get_or_create_pipeline(
        repo="octo/other",
        key="issue:12",
        kind=PipelineKind.ISSUE,
        branch="trimo/issue-12",
        title="x",
    )
    assert again.id == first.id
    assert again.branch == "trimo/issue-12"  # the pushed branch never moves
    assert again.title == "Fix the login page (renamed)"
    assert again.installation_id == 99
    assert other_repo.id != first.id
    assert store.find_pipeline("octo/app", "issue:12") == again
    assert store.find_pipeline("octo/app", "issue:13") is None


def test_update_pipeline_sets_fields_and_refuses_unknown_ones(store: Store) -> None:
    pipeline = _pipeline(store)
    store.update_pipeline(pipeline.id, pr_number=7, approved_sha="abc123")
    updated = store.get_pipeline(pipeline.id)
    assert (updated.pr_number, updated.approved_sha) == (7, "abc123")
    with pytest.raises(TypeError, match=r"no field.*colour"):
        store.update_pipeline(pipeline.id, colour="red")


# -- runs --------------------------------------------------------------------------------------


def test_a_run_goes_from_queued_through_claim_to_a_final_state(store: Store) -> None:
    pipeline = _pipeline(store)
    run = store.create_run(
        pipeline.id,
        trigger="comment",
        task="Fix it",
        mode=RunMode.TESTS,
        sender="mona",
        instructions="only the login page",
        head_sha="a" * 40,
    )
    assert run.state is RunState.QUEUED and run.mode is RunMode.TESTS
    assert run.created_at.tzinfo is not None and run.created_at.utcoffset() == timedelta(0)

    claimed = store.claim_run("worker-1")
    assert claimed is not None and claimed.id == run.id
    assert claimed.state is RunState.PREPARING and claimed.worker_id == "worker-1"
    assert claimed.started_at is not None and claimed.lease_expires_at is not None
    assert store.claim_run("worker-2") is None

    store.set_state(run.id, RunState.AGENT, expect=LIVE)
    done = store.set_state(
        run.id, RunState.SUCCEEDED, expect=LIVE, reason="all green", summary="ok"
    )
    assert done.state is RunState.SUCCEEDED and done.finished
    assert done.reason == "all green" and done.summary == "ok"
    assert done.finished_at is not None and done.finished_at >= claimed.started_at

    states = [e.message for e in store.events(run.id, kinds=["state"])]
    assert states == ["queued", "preparing", "agent", "succeeded"]


def test_a_run_queued_for_a_delivery_is_that_deliverys_from_the_same_transaction(
    store: Store,
) -> None:
    """Processing a delivery again after the store failed right after its run was queued finds
    that run: it is never queued a second time."""
    pipeline = _pipeline(store)
    run = store.create_run(pipeline.id, trigger="label", task="t", delivery_key="d-1:run")
    assert store.delivery_run("d-1:run") == run.id
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.create_run(pipeline.id, trigger="label", task="t", delivery_key="d-1:run")
    assert [r.id for r in store.list_runs()] == [run.id]


def test_a_refused_run_is_rejected_as_it_is_recorded_and_never_claimed(store: Store) -> None:
    """A command from someone without the permission is recorded, but no worker free at that
    moment can take it: it is never queued."""
    pipeline = _pipeline(store)
    run = store.create_run(
        pipeline.id, trigger="comment", task="t", sender="reader", refused="needs write"
    )
    assert run.state is RunState.REJECTED and run.reason == "needs write"
    assert store.claim_run("w") is None
    assert store.claim_run("w", run_id=run.id) is None
    assert store.get_run(run.id).finished_at is not None
    assert [e.message for e in store.events(run.id, kinds=["state"])] == ["queued", "rejected"]


def test_the_first_final_state_wins(store: Store) -> None:
    run = store.create_run(_pipeline(store).id, trigger="label", task="t")
    store.set_state(run.id, RunState.CANCELLED, expect=LIVE, reason="stopped by mona")
    after = store.set_state(run.id, RunState.SUCCEEDED, expect=LIVE, reason="late finish")
    assert after.state is RunState.CANCELLED and after.reason == "stopped by mona"
    assert [e.message for e in store.events(run.id, kinds=["state"])] == ["queued", "cancelled"]


def test_claiming_a_given_run_takes_only_that_run(store: Store) -> None:
    pipeline = _pipeline(store)
    first = store.create_run(pipeline.id, trigger="label", task="one")
    second = store.create_run(pipeline.id, trigger="label", task="two")
    claimed = store.claim_run("w", run_id=second.id)
    assert claimed is not None and claimed.id == second.id
    assert store.claim_run("w", run_id=second.id) is None
    assert store.get_run(first.id).state is RunState.QUEUED


def test_concurrent_claimers_never_get_the_same_run(store_url: str) -> None:
    # Two Store objects on one database behave like two worker processes.
    stores = [Store(store_url), Store(store_url)]
    try:
        pipeline = _pipeline(stores[0])
        created = {
            stores[0].create_run(pipeline.id, trigger="t", task=str(i)).id for i in range(40)
        }
        claimed: list[int] = []
        lock = threading.Lock()
        errors: list[Exception] = []

        def claim(store: Store, worker: str) -> None:
            try:
                while (run := store.claim_run(worker)) is not None:
                    with lock:
                        claimed.append(run.id)
            except Exception as exc:  # noqa: BLE001 - surfaced below, from the main thread
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(stores[i % 2], f"w{i}")) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert sorted(claimed) == sorted(created)  # each run exactly once
        assert stores[1].queued_count() == 0
    finally:
        for s in stores:
            s.close()


def test_an_unknown_run_is_reported_by_id(store: Store) -> None:
    with pytest.raises(NoSuchRunError, match="no run with id 4242"):
        store.get_run(4242)
    with pytest.raises(NoSuchRunError):
        store.update_run(4242, summary="x")


def test_run_fields_round_trip_including_failures_and_the_report(store: Store) -> None:
    run = store.create_run(_pipeline(store).id, trigger="label", task="t")
    failures = [{"name": "test_login", "file": "tests/test_login.py", "line": 3}]
    store.update_run(
        run.id,
        container_id="c0ffee",
        base_sha="b" * 40,
        head_sha="c" * 40,
        commits=2,
        tests_passed=10,
        tests_failed=1,
        tests_skipped=2,
        tests_errors=0,
        failures=failures,
        report={"tests": {"passed": 10}},
        comment_id=2**40,
        check_run_id=2**41,
        pr_number=8,
        image_tag="trimo/octo-app:abc",
        error="boom",
    )
    got = store.get_run(run.id)
    assert got.failures == failures and got.report == {"tests": {"passed": 10}}
    assert (got.commits, got.tests_passed, got.tests_failed, got.tests_skipped) == (2, 10, 1, 2)
    assert (got.comment_id, got.check_run_id) == (2**40, 2**41)
    assert (got.container_id, got.image_tag, got.error) == ("c0ffee", "trimo/octo-app:abc", "boom")
    with pytest.raises(TypeError, match=r"runs has no field.*colour"):
        store.update_run(run.id, colour="red")


def test_cancel_is_requested_on_live_runs_only(store: Store) -> None:
    run = store.create_run(_pipeline(store).id, trigger="label", task="t")
    assert store.request_cancel(run.id, "stopped by mona") is True
    got = store.get_run(run.id)
    assert got.cancel_requested and got.cancel_reason == "stopped by mona"
    store.set_state(run.id, RunState.CANCELLED, expect=LIVE)
    assert store.request_cancel(run.id, "again") is False


def test_live_expired_and_listed_runs(store: Store) -> None:
    pipeline = _pipeline(store)
    other = _pipeline(store, key="pull:7")
    a = store.create_run(pipeline.id, trigger="t", task="a")
    b = store.create_run(other.id, trigger="t", task="b")
    c = store.create_run(pipeline.id, trigger="t", task="c")
    store.set_state(a.id, RunState.FAILED, expect=LIVE)
    assert [r.id for r in store.live_runs()] == [b.id, c.id]
    assert [r.id for r in store.live_runs(pipeline.id)] == [c.id]
    assert [r.id for r in store.list_runs()] == [c.id, b.id, a.id]
    assert [r.id for r in store.list_runs(limit=1, pipeline_id=pipeline.id)] == [c.id]

    assert store.claim_run("w", run_id=b.id, lease=timedelta(minutes=5)) is not None
    assert store.expired_runs() == []
    assert store.claim_run("w", run_id=c.id, lease=timedelta(milliseconds=10)) is not None
    time.sleep(0.05)
    assert [r.id for r in store.expired_runs()] == [c.id]
    assert store.renew_leases("w", [b.id, c.id], timedelta(seconds=5)) == {b.id, c.id}
    assert store.expired_runs() == []


# -- events and logs ---------------------------------------------------------------------------


def test_events_and_logs_come_back_in_order_and_filtered(store: Store) -> None:
    run = store.create_run(_pipeline(store).id, trigger="t", task="t")
    store.add_event(run.id, "phase", "agent", {"phase": "agent"})
    store.add_logs(run.id, [f"line {i}" for i in range(500)])
    store.add_event(run.id, "tests", "", {"passed": 3})
    every = store.events(run.id)
    assert [e.id for e in every] == sorted(e.id for e in every)
    logs = store.events(run.id, kinds=["log"])
    assert [e.message for e in logs] == [f"line {i}" for i in range(500)]
    after = store.events(run.id, after_id=logs[-1].id)
    assert [(e.kind, e.data) for e in after] == [("tests", {"passed": 3})]
    assert all(e.created_at.tzinfo is not None for e in every)
    assert len(store.events(run.id, limit=10)) == 10


# -- webhook deliveries ------------------------------------------------------------------------


def test_a_redelivery_is_recognised(store: Store) -> None:
    intents = json.dumps([{"intent": "run", "issue": 12}])
    assert store.record_delivery("d-1", "issues", "labeled", intents) is True
    assert store.record_delivery("d-1", "issues", "labeled", intents) is False
    delivery = store.claim_delivery()
    assert delivery is not None
    assert delivery.delivery_id == "d-1" and delivery.intents == [{"intent": "run", "issue": 12}]
    assert delivery.received_at.tzinfo is not None
    assert store.claim_delivery() is None  # taken


def test_deliveries_without_intents_are_deduplicated_but_never_queued(store: Store) -> None:
    assert store.record_delivery("d-ping", "ping", None, "[]") is True
    assert store.record_delivery("d-ping", "ping", None, "[]") is False
    assert store.claim_delivery() is None
    assert store.pending_deliveries() == 0


def test_deliveries_are_claimed_oldest_first_and_finished(store: Store) -> None:
    for i in range(3):
        store.record_delivery(f"d-{i}", "issue_comment", "created", f'[{{"n": {i}}}]')
    first = store.claim_delivery()
    second = store.claim_delivery()
    assert first is not None and second is not None
    assert (first.delivery_id, second.delivery_id) == ("d-0", "d-1")
    store.finish_delivery("d-0")
    store.finish_delivery("d-1", error="GitHub said 502")
    assert store.pending_deliveries() == 1
    third = store.claim_delivery()
    assert third is not None and third.delivery_id == "d-2"


def test_a_delivery_whose_lease_expired_is_claimed_again_below_newer_ones(store: Store) -> None:
    for i in range(3):
        store.record_delivery(f"d-{i}", "issues", "labeled", f"[{i}]")
    # Its worker dies before finishing it, and so stops renewing its lease.
    abandoned = store.claim_delivery("dead-worker", timedelta(seconds=1))
    assert abandoned is not None and abandoned.delivery_id == "d-0"
    for expected in ("d-1", "d-2"):
        delivery = store.claim_delivery("live-worker")
        assert delivery is not None and delivery.delivery_id == expected
        assert store.finish_delivery(expected, owner="live-worker")
    assert store.claim_delivery("live-worker") is None  # leased: not taken twice
    assert store.pending_deliveries() == 1
    time.sleep(1.1)
    again = store.claim_delivery("live-worker")
    assert again is not None and again.delivery_id == "d-0" and again.attempts == 2
    # The dead worker's late word no longer counts: the delivery is another's now.
    assert not store.finish_delivery("d-0", owner="dead-worker")
    assert store.finish_delivery("d-0", owner="live-worker")


def test_a_renewed_lease_keeps_a_delivery_from_other_workers(store: Store) -> None:
    store.record_delivery("d-slow", "issues", "labeled", "[1]")
    held = store.claim_delivery("worker-a", timedelta(seconds=1))
    assert held is not None
    for _ in range(3):
        time.sleep(0.5)
        assert store.renew_delivery_leases("worker-a", ["d-slow"], timedelta(seconds=1)) == 1
        assert store.claim_delivery("worker-b") is None


def test_a_failed_delivery_is_retried_later_then_marked_failed_and_retried_by_hand(
    store: Store,
) -> None:
    store.record_delivery("d-flaky", "issues", "labeled", "[1]")
    first = store.claim_delivery("w")
    assert first is not None and first.attempts == 1
    assert store.retry_delivery_later("d-flaky", "GitHubWriteError: 502", timedelta(seconds=1), "w")
    assert store.claim_delivery("w") is None  # not due yet
    (waiting,) = store.list_deliveries(DeliveryState.RETRYING)
    assert waiting.error == "GitHubWriteError: 502" and waiting.next_attempt_at is not None
    time.sleep(1.1)
    second = store.claim_delivery("w")
    assert second is not None and second.attempts == 2
    assert second.previous_error == "GitHubWriteError: 502"
    store.finish_delivery("d-flaky", "gave up after 2 attempts", owner="w")
    counts = store.delivery_counts()
    assert counts[DeliveryState.FAILED] == 1 and counts[DeliveryState.PENDING] == 0
    retried = store.retry_delivery("d-flaky")
    assert retried is not None and retried.state == DeliveryState.RETRYING
    third = store.claim_delivery("w")
    assert third is not None and third.delivery_id == "d-flaky" and third.attempts == 1
    store.finish_delivery("d-flaky", owner="w")
    assert store.delivery_counts()[DeliveryState.PROCESSED] == 1
    assert store.retry_delivery("no-such-delivery") is None


def test_deliveries_recorded_after_all_were_processed_are_claimed_in_order(
    store_url: str,
) -> None:
    with Store(store_url) as worker, Store(store_url) as receiver:
        for i in range(3):
            receiver.record_delivery(f"d-{i}", "issues", "labeled", f"[{i}]")
        while (delivery := worker.claim_delivery()) is not None:
            worker.finish_delivery(delivery.delivery_id)
        assert worker.claim_delivery() is None
        for i in range(3, 6):
            receiver.record_delivery(f"d-{i}", "issues", "labeled", f"[{i}]")
        claimed = []
        while (delivery := worker.claim_delivery()) is not None:
            claimed.append(delivery.delivery_id)
            worker.finish_delivery(delivery.delivery_id)
        assert claimed == ["d-3", "d-4", "d-5"]
        assert worker.pending_deliveries() == 0


def test_old_processed_deliveries_are_pruned_but_pending_and_newest_kept(store: Store) -> None:
    for i in range(4):
        store.record_delivery(f"d-{i}", "issues", "labeled", f"[{i}]")
    for _ in range(3):
        delivery = store.claim_delivery()
        assert delivery is not None
        store.finish_delivery(delivery.delivery_id)
    store.record_delivery("d-ignored", "ping", None, "[]")  # processed on arrival, newest
    assert store.prune_deliveries(timedelta(days=1)) == 0  # nothing old enough yet
    assert store.prune_deliveries(timedelta(0)) == 3
    assert store.record_delivery("d-0", "issues", "labeled", "[0]") is True  # forgotten
    assert store.record_delivery("d-ignored", "ping", None, "[]") is False  # newest kept
    assert store.record_delivery("d-3", "issues", "labeled", "[3]") is False  # still pending
    claimed = [store.claim_delivery(), store.claim_delivery()]
    assert [d.delivery_id for d in claimed if d] == ["d-3", "d-0"]


def _wal_restarts(wal: Path) -> int:
    """The WAL header's checkpoint sequence number, one more each time the WAL starts over."""
    with wal.open("rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def test_under_sustained_deliveries_the_wal_starts_over_instead_of_growing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small thresholds, and SQLite's own checkpoint too far away to be what keeps it bounded.
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_RESTART_PAGES", 300)
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_REMAINDER_PAGES", 50)
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_BACKSTOP_PAGES", 1_000_000)
    wal = tmp_path / "trimo.db-wal"
    intents = json.dumps([{"body": "x" * 1300}])
    # Nothing but the checkpoint thread copies the WAL here, and a WAL starts over only once all
    # of it was copied: each restart is the thread's doing, and what keeps the WAL bounded.
    threads_before = set(threading.enumerate())
    with Store(Store.sqlite_url(tmp_path)) as store:
        store.record_delivery("first", "issues", "labeled", intents)
        (checkpointer,) = (
            t
            for t in threading.enumerate()
            if t.name == "trimo-checkpoint" and t not in threads_before
        )
        restarts = _wal_restarts(wal)
        written = 1
        deadline = time.monotonic() + 60
        # Every delivery appends a few 4 KB pages; write without a pause until the WAL has
        # started over a few times.
        while _wal_restarts(wal) < restarts + 3 and time.monotonic() < deadline:
            for _ in range(100):
                store.record_delivery(str(uuid.uuid4()), "issues", "labeled", intents)
            written += 100
        assert _wal_restarts(wal) >= restarts + 3, f"the WAL never started over in {written}"
        assert store.pending_deliveries() == written
        assert checkpointer.is_alive()
    assert not checkpointer.is_alive()  # closing the store stops its thread


def test_concurrent_delivery_claimers_each_get_distinct_deliveries(store_url: str) -> None:
    stores = [Store(store_url), Store(store_url)]
    try:
        for i in range(30):
            stores[0].record_delivery(f"d-{i}", "issues", "labeled", "[1]")
        got: list[str] = []
        lock = threading.Lock()

        def claim(store: Store) -> None:
            while (d := store.claim_delivery()) is not None:
                with lock:
                    got.append(d.delivery_id)

        threads = [threading.Thread(target=claim, args=(stores[i % 2],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == sorted(f"d-{i}" for i in range(30))
    finally:
        for s in stores:
            s.close()


def test_recording_a_delivery_is_fast_on_sqlite(tmp_path: Path) -> None:
    with Store(Store.sqlite_url(tmp_path)) as store:
        timings = []
        for i in range(300):
            start = time.perf_counter()
            store.record_delivery(f"d-{i}", "issues", "labeled", '[{"intent": "run"}]')
            timings.append(time.perf_counter() - start)
        # The webhook answers inside GitHub's 10 s; this keeps the store far out of the way.
        assert statistics.median(timings) < 0.002


# -- installations -----------------------------------------------------------------------------


def test_installations_map_repositories_to_their_installation(store: Store) -> None:
    store.upsert_installation(1, "octo", ["octo/app", "octo/lib"])
    store.upsert_installation(2, "Hubber", None)  # all repositories
    assert store.installation_for_repo("octo/app") == 1
    assert store.installation_for_repo("hubber/anything") == 2
    assert store.installation_for_repo("octo/new") is None

    store.add_installation_repos(1, ["octo/new", "octo/app"], account="octo")
    store.remove_installation_repos(1, ["octo/lib"])
    installation = store.get_installation(1)
    assert installation is not None and installation.repos == ["octo/app", "octo/new"]
    store.upsert_installation(1, "octo", ["octo/only"])
    assert store.get_installation(1) == type(installation)(1, "octo", ["octo/only"])

    store.delete_installation(1)
    assert store.get_installation(1) is None
    assert store.installation_for_repo("octo/only") is None


def test_installation_events_in_any_order_are_recorded_and_never_fail(store: Store) -> None:
    # Repositories added to an installation Trimo never saw created (installed before Trimo
    # first ran): the installation is recorded with them, its account as the event says.
    store.add_installation_repos(7, ["octo/app"], account="octo")
    assert store.get_installation(7) == Installation(7, "octo", ["octo/app"])
    assert store.installation_for_repo("octo/app") == 7
    # Recording it again (a suspend, a redelivery) adds, keeps the account, replaces nothing.
    store.add_installation_repos(7, [], account="renamed")
    store.add_installation_repos(7, ["octo/app", "octo/lib"], account="octo")
    assert store.get_installation(7) == Installation(7, "octo", ["octo/app", "octo/lib"])
    # Removing what is not known, or from an installation not known, changes nothing.
    store.remove_installation_repos(7, ["octo/never"])
    store.remove_installation_repos(8, ["octo/app"])
    store.delete_installation(8)
    assert store.get_installation(7) == Installation(7, "octo", ["octo/app", "octo/lib"])
    assert store.get_installation(8) is None


# -- posted GitHub objects ---------------------------------------------------------------------


def test_posted_ids_are_remembered_per_run_and_kind(store: Store) -> None:
    run = store.create_run(_pipeline(store).id, trigger="t", task="t")
    assert store.recall(run.id, "comment") is None
    store.remember(run.id, "comment", 1_234_567_890_123)
    store.remember(run.id, "check_run", 5)
    store.remember(run.id, "check_run", 6)
    assert store.recall(run.id, "comment") == 1_234_567_890_123
    assert store.recall(run.id, "check_run") == 6


def test_snapshots_outlive_the_store(store_url: str) -> None:
    with Store(store_url) as store:
        run = store.create_run(_pipeline(store).id, trigger="t", task="t")
    assert run.task == "t" and run.created_at.tzinfo == UTC
    with pytest.raises(AttributeError):
        run.task = "changed"  # type: ignore[misc]


# -- model usage -------------------------------------------------------------------------------


def test_usage_joins_the_report_and_sums_per_installation_and_day(store: Store) -> None:
    ours = _pipeline(store)
    other = _pipeline(store, "issue:13")
    store.get_or_create_pipeline(
        repo="octo/else",
        key="issue:1",
        kind=PipelineKind.ISSUE,
        branch="b",
        title="t",
        installation_id=7,
    )
    elsewhere = store.find_pipeline("octo/else", "issue:1")
    assert elsewhere is not None
    one = store.create_run(ours.id, trigger="label", task="t")
    two = store.create_run(other.id, trigger="label", task="t")
    far = store.create_run(elsewhere.id, trigger="label", task="t")
    store.merge_report(one.id, commits=[["abc", "Fix"]], branch="trimo/x")
    store.merge_report(one.id, usage={"input_tokens": 10, "output_tokens": 2, "usd": 1.5})
    store.merge_report(two.id, usage={"usd": 0.25})
    store.merge_report(far.id, usage={"usd": 9.0})
    run = store.get_run(one.id)
    assert run.usage == {"input_tokens": 10, "output_tokens": 2, "usd": 1.5}
    assert (run.report or {})["commits"] == [["abc", "Fix"]]  # merged, not replaced
    since = one.created_at - timedelta(minutes=1)
    assert store.model_usd_since(99, since) == pytest.approx(1.75)
    assert store.model_usd_since(7, since) == pytest.approx(9.0)
    assert store.model_usd_since(99, one.created_at + timedelta(days=1)) == 0.0
    assert store.model_usd_since(None, since) == 0.0
