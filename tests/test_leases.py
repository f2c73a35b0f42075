"""Leases and compare-and-set: a run is held by the worker that renews its lease, judged dead
only when that lease lapsed (and, on this host, the worker's process is gone), and no two
parties both win a state change."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from bot.leases import LeaseKeeper, LeaseTerms
from bot.states import ACTIVE, LIVE, PipelineKind, RunState
from bot.store import Run, Store
from bot.worker import _process_start, reap, worker_id
from tests.cas_race import canceller, claimer, race_in_threads
from tests.containers import trimo_free_env

ROUNDS = 40
HERE = socket.gethostname()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    try:
        yield s
    finally:
        s.close()


def _queued(store: Store, count: int = 1, key: str = "issue:1") -> list[Run]:
    pipeline = store.get_or_create_pipeline(
        repo="octo/app", key=key, kind=PipelineKind.ISSUE, branch="trimo/1-x", title="x"
    )
    return [store.create_run(pipeline.id, trigger="label", task="t") for _ in range(count)]


def _dead_owner() -> str:
    """The worker id a process of this host had, once it has exited."""
    proc = subprocess.Popen(["sleep", "30"])
    owner = f"{HERE}:{proc.pid}:{_process_start(proc.pid)}"
    proc.kill()
    proc.wait(10)
    return owner


# -- compare-and-set ---------------------------------------------------------------------------


def _check_one_winner(
    store: Store, runs: list[Run], claimed: list[bool], cancelled: list[bool]
) -> None:
    assert len(claimed) == len(cancelled) == len(runs)
    for run, claim_won, cancel_won in zip(runs, claimed, cancelled, strict=True):
        assert claim_won != cancel_won, f"run {run.id}: claim {claim_won}, cancel {cancel_won}"
        now = store.get_run(run.id)
        if claim_won:
            # The cancel came second: it became a request the worker acts on.
            assert now.state == RunState.PREPARING and now.worker_id == "claimer"
            assert now.cancel_requested
        else:
            assert now.state == RunState.CANCELLED and now.worker_id is None


def test_a_cancel_and_a_claim_never_both_win_between_threads(store: Store) -> None:
    runs = _queued(store, ROUNDS)
    claimed, cancelled = race_in_threads(store, [r.id for r in runs])
    _check_one_winner(store, runs, claimed, cancelled)


@pytest.mark.timeout(120)
def test_a_cancel_and_a_claim_never_both_win_between_processes(
    store: Store, store_url: str
) -> None:
    runs = _queued(store, ROUNDS)
    ids = [r.id for r in runs]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=side, args=(store_url, ids, barrier, results))
        for side in (claimer, canceller)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    _check_one_winner(store, runs, got["claimer"], got["canceller"])


def test_a_state_change_happens_only_from_the_states_it_names(store: Store) -> None:
    (run,) = _queued(store)
    # Not yet claimed: a worker's phase change does not apply to a queued run.
    unchanged = store.set_state(run.id, RunState.AGENT, expect=ACTIVE)
    assert unchanged.state == RunState.QUEUED
    assert store.claim_run("w1", run.id) is not None
    # A cancel of a queued run (the race a claim wins) does not apply any more.
    assert store.set_state(run.id, RunState.CANCELLED, expect=RunState.QUEUED).state == (
        RunState.PREPARING
    )
    # Another worker than the holder moves nothing.
    assert store.set_state(run.id, RunState.AGENT, expect=ACTIVE, owner="w2").state == (
        RunState.PREPARING
    )
    assert store.set_state(run.id, RunState.AGENT, expect=ACTIVE, owner="w1").state == (
        RunState.AGENT
    )
    done = store.set_state(run.id, RunState.SUCCEEDED, expect=ACTIVE, owner="w1")
    late = store.set_state(run.id, RunState.ERROR, expect=LIVE, reason="late")
    assert done.state == late.state == RunState.SUCCEEDED and late.reason is None
    with pytest.raises(ValueError, match="live states"):
        store.set_state(run.id, RunState.QUEUED, expect=RunState.SUCCEEDED)
    states = [e.message for e in store.events(run.id, kinds=["state"])]
    assert states == ["queued", "preparing", "agent", "succeeded"]


def test_a_requeued_run_is_held_by_no_one(store: Store) -> None:
    (run,) = _queued(store)
    assert store.claim_run("w1", run.id, host=HERE, engine_id="e1") is not None
    back = store.set_state(run.id, RunState.QUEUED, expect=RunState.PREPARING, owner="w1")
    assert back.state == RunState.QUEUED
    assert (back.worker_id, back.lease_host, back.lease_expires_at, back.engine_id) == (
        None,
        None,
        None,
        None,
    )
    assert store.claim_run("w2", run.id) is not None


# -- leases in the store -----------------------------------------------------------------------


def test_a_lease_is_renewed_by_its_holder_only_and_reaped_only_once_expired(store: Store) -> None:
    a, b = _queued(store, 2)
    claimed = store.claim_run("w1", a.id, host=HERE, engine_id="e1", lease=timedelta(minutes=5))
    assert claimed is not None
    assert (claimed.lease_host, claimed.engine_id) == (HERE, "e1")
    assert claimed.lease_expires_at is not None
    assert store.claim_run("w2", b.id, lease=timedelta(0)) is not None

    assert store.reap_run(a.id, "gone") is False  # its lease runs for minutes yet
    assert [r.id for r in store.expired_runs()] == [b.id]
    # Renewal by another worker, or of a run not held, renews nothing.
    assert store.renew_leases("w2", [a.id], timedelta(minutes=5)) == set()
    assert store.renew_leases("w1", [a.id, b.id], timedelta(minutes=10)) == {a.id}
    assert store.get_run(a.id).lease_expires_at > claimed.lease_expires_at  # type: ignore[operator]

    assert store.reap_run(b.id, "its worker is gone") is True
    assert store.reap_run(b.id, "again") is False
    gone = store.get_run(b.id)
    assert gone.state == RunState.ERROR and gone.reason == "its worker is gone"
    assert store.renew_leases("w2", [b.id], timedelta(minutes=5)) == set()


def test_the_keeper_renews_from_its_own_thread_and_tells_when_the_lease_is_lost(
    store: Store,
) -> None:
    (run,) = _queued(store)
    terms = LeaseTerms(length=timedelta(seconds=1), renew_every=timedelta(seconds=0.2))
    assert store.claim_run("w1", run.id, lease=terms.length) is not None
    keeper = LeaseKeeper(store, "w1", terms)
    lost = threading.Event()
    with keeper.hold(run.id, lost.set):
        # This thread is busy elsewhere (an image build, say) for three lease lengths.
        time.sleep(3)
        assert store.expired_runs() == []
        assert not lost.is_set()
        # The run is taken from it (here: ended by someone else): the keeper says so.
        store.set_state(run.id, RunState.ERROR, expect=ACTIVE, reason="taken")
        assert lost.wait(3)
    assert run.id not in keeper.held()


def test_lease_terms_must_allow_a_late_renewal() -> None:
    with pytest.raises(ValueError, match="renew at least twice"):
        LeaseTerms(length=timedelta(seconds=5), renew_every=timedelta(seconds=3))


# -- the reaper --------------------------------------------------------------------------------


def test_the_reaper_ends_a_run_only_when_its_lease_lapsed_and_its_worker_is_gone(
    store: Store,
) -> None:
    alive_here, dead_here, elsewhere, renewed_elsewhere = _queued(store, 4)
    expired = timedelta(0)
    me = worker_id()
    assert store.claim_run(me, alive_here.id, host=HERE, lease=expired)
    dead = _dead_owner()
    assert store.claim_run(dead, dead_here.id, host=HERE, lease=expired)
    assert store.claim_run("far:1:1", elsewhere.id, host="far", lease=expired)
    assert store.claim_run("far:2:2", renewed_elsewhere.id, host="far", lease=timedelta(minutes=5))

    # A `trimo` command: only this host's runs, whose workers it can check.
    said = reap(store, None)
    assert said == [f"run {dead_here.id}: marked error (its worker {dead} is gone)"]
    # A worker: another host's run is dead once its lease lapsed.
    said = reap(store, None, any_host=True)
    assert said == [f"run {elsewhere.id}: marked error (its worker far:1:1 is gone)"]

    runs = (alive_here, dead_here, elsewhere, renewed_elsewhere)
    states = {r.id: store.get_run(r.id).state for r in runs}
    assert states == {
        alive_here.id: RunState.PREPARING,  # expired, but its process on this host lives
        dead_here.id: RunState.ERROR,
        elsewhere.id: RunState.ERROR,
        renewed_elsewhere.id: RunState.PREPARING,
    }
    reason = store.get_run(elsewhere.id).reason or ""
    assert "far:1:1" in reason and "stopped renewing its lease" in reason and me in reason


def test_a_trimo_command_leaves_another_host_s_runs_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = Store.sqlite_url(data)
    with Store(url) as store:
        far, gone = _queued(store, 2)
        assert store.claim_run("far:1:1", far.id, host="far", lease=timedelta(0))
        dead = _dead_owner()
        assert store.claim_run(dead, gone.id, host=HERE, lease=timedelta(0))
    env = trimo_free_env()
    r = subprocess.run(
        [sys.executable, "-m", "bot", "runs", "ls"],
        env={**env, "TRIMO_DATA_DIR": str(data), "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"run {gone.id}: marked error" in r.stderr and f"run {far.id}" not in r.stderr
    with Store(url) as store:
        assert store.get_run(far.id).state == RunState.PREPARING
        assert store.get_run(gone.id).state == RunState.ERROR
