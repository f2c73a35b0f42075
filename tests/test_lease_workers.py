"""Worker processes that die, freeze or build for long, on one engine and one store: every run
ends with a reason or succeeds, nothing of it is left on the engine after the lease period,
and a live worker's run is never judged dead, whatever phase it is in. A GitHub run's worker
killed while its reports go out leaves GitHub one tracking comment, one check run of each
kind, each completed."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import docker
import pytest

from bot.states import RunState
from bot.store import Run, Store
from tests.conftest import BACKENDS, empty_database
from tests.containers import make_repo
from tests.fleet import (
    Fleet,
    can_start_other_host,
    kill_round,
    leftovers,
    local_run,
    remove_everything_of,
    wait_until,
)
from tests.fleet_github import (
    HELD_WRITES,
    audit,
    github_kill_round,
    reports_settled,
    retry_issue,
    served_github,
)

pytestmark = pytest.mark.docker

NO_OTHER_HOST = "needs `unshare -u` (root) to start a worker with a hostname of its own"
WORKER_DIED = "stopped renewing its lease"


@pytest.fixture(params=BACKENDS)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    base_image: str,
    docker_client: docker.DockerClient,
) -> Iterator[tuple[Fleet, Store]]:
    with empty_database(request.param, tmp_path / "data") as url:
        store = Store(url)
        workers = Fleet(tmp_path / "data", url)
        try:
            yield workers, store
        finally:
            workers.close()
            remove_everything_of(docker_client, store)
            store.close()


def _finished(store: Store, run_id: int) -> Run | None:
    run = store.get_run(run_id)
    return run if run.finished else None


# Each phase once in the suite, two per backend (bench/leases.py: 20 rounds at random phases).
PHASES_OF = {"sqlite": ("prepare", "publish"), "postgresql": ("build", "agent")}


@pytest.mark.timeout(300)
def test_a_worker_killed_in_any_phase_loses_no_run_and_leaves_nothing(
    fleet: tuple[Fleet, Store], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    workers, store = fleet
    phases = PHASES_OF[store.dialect_name]
    workers.start("here")
    # Whichever worker claims a run is killed; the other one (this host's, or another host's
    # where the machine allows one) ends the run once its lease lapsed.
    workers.start("there", other_host=can_start_other_host())
    rounds = [
        kill_round(workers, store, docker_client, tmp_path / f"repo-{phase}", phase)
        for phase in phases
    ]
    for r in rounds:
        # Killed before its final state, the run ends `error` saying why; a kill that came as
        # the run finished leaves it as it ended.
        assert (r.final_state == "error" and WORKER_DIED in r.reason) or (
            r.final_state == "succeeded"
        ), r
        # Ended within the lease and a reaper's round after it (and the bounded wait above).
        assert r.seconds_to_end < workers.lease * 2 + 15, r
    assert [r.state_at_kill for r in rounds if r.final_state == "error"], rounds
    # The pipeline a killed run left is not wedged: its next run succeeds.
    again = local_run(store, tmp_path / f"repo-{phases[-1]}", "echo again > again.txt")
    final = wait_until("the next run ended", lambda: _finished(store, again.id), 120, 0.2)
    assert final.state == RunState.SUCCEEDED, final.reason
    assert leftovers(docker_client, store, again.id) == []


# A kill before the run's end, and one while GitHub holds a write of it (bench/leases.py
# --github: 20 rounds at random phases).
GITHUB_ROUNDS_OF = {
    "sqlite": (("agent", None), ("publish", HELD_WRITES[1])),
    "postgresql": (("prepare", None), ("publish", HELD_WRITES[0])),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_github_run_s_killed_worker_posts_nothing_twice_and_leaves_no_check_run_open(
    backend: str, tmp_path: Path, base_image: str, docker_client: docker.DockerClient
) -> None:
    data = tmp_path / "data"
    with empty_database(backend, data) as url:
        store = Store(url)
        with served_github(data, url, store) as github:
            workers = Fleet(data, url, settings=github.worker_env())
            try:
                workers.start("here")
                workers.start("there", other_host=can_start_other_host())
                rounds = [
                    github_kill_round(
                        workers, store, docker_client, github, tmp_path / f"r-{phase}", phase, held
                    )
                    for phase, held in GITHUB_ROUNDS_OF[backend]
                ]
                for r in rounds:
                    assert (r.final_state == "error" and WORKER_DIED in r.reason) or (
                        r.final_state == "succeeded"
                    ), r
                    # Its end reached GitHub within the lease and a few rounds of the sender.
                    assert r.seconds_to_reported < workers.lease * 3 + 15, r
                # The held create reached GitHub once, though its sender died before the answer.
                method, path = rounds[-1].phase.split(":", 1)[1].split(" ")
                sent = github.fake.requests_to(method, rf"/repos/{rounds[-1].repo}/{path}$")
                assert len(sent) == 1, sent
                nexts = [retry_issue(github, store, r.repo, r.number, r.run_id) for r in rounds]
                for n in nexts:
                    final = wait_until("the next run", lambda n=n: _finished(store, n.id), 120)
                    assert final.state == RunState.SUCCEEDED, final.reason
                run_ids = [r.run_id for r in rounds] + [n.id for n in nexts]
                wait_until("every report sent", lambda: reports_settled(store, run_ids), 60, 0.2)
                found = audit(github, store, run_ids)
                assert found.problems == []
                assert [s["tracking_comments"] for s in found.runs.values()] == [1] * len(run_ids)
            finally:
                workers.close()
                remove_everything_of(docker_client, store)
                store.close()


# The 150 s build with the default 30 s lease, scaled down for every suite run: a 3 s lease and
# a 12 s build. `TRIMO_TEST_LONG_BUILD=150:30:5` (build, lease, renew seconds) runs it full size.
LONG_BUILD, LONG_LEASE, LONG_RENEW = (
    float(x) for x in os.environ.get("TRIMO_TEST_LONG_BUILD", "12:3:0.5").split(":")
)


@pytest.mark.timeout(max(300, 2 * LONG_BUILD + 120))
def test_a_long_image_build_is_not_judged_dead_by_a_worker_on_another_host(
    fleet: tuple[Fleet, Store], tmp_path: Path
) -> None:
    """A build that outlasts the lease several times over, a second worker on another host
    reaping meanwhile: renewal does not depend on the phase."""
    if not can_start_other_host():
        pytest.skip(NO_OTHER_HOST)
    workers, store = fleet
    workers.lease, workers.renew = LONG_LEASE, LONG_RENEW
    token = uuid.uuid4().hex[:12]
    repo = tmp_path / f"long-build-{token}"
    make_repo(
        repo,
        {
            "README.md": "# long build\n",
            ".trimo/Dockerfile": (
                f"FROM trimo/base:bookworm\nRUN echo 'building {token}' && sleep {LONG_BUILD:g}\n"
            ),
        },
    )
    workers.start("builder")
    run = local_run(store, repo, "echo built > built.txt")

    def building() -> bool:
        logs = store.events(run.id, kinds=["log"])
        return any(f"building {token}" in e.message for e in logs)

    wait_until("the build under way", building, 120, 0.1)
    assert workers.holder(store.get_run(run.id)) == "builder"
    workers.start("watcher", other_host=True)
    expiries: list[datetime] = []
    while not store.events(run.id, kinds=["image"]) and not store.get_run(run.id).finished:
        expiry = store.get_run(run.id).lease_expires_at
        assert expiry is not None
        expiries.append(expiry)
        time.sleep(1)
    final = wait_until("the run ended", lambda: _finished(store, run.id), 120, 0.2)
    assert final.state == RunState.SUCCEEDED, final.reason
    built = store.events(run.id, kinds=["image"])[0].message
    assert " built in " in built, built
    # The build outlasted its lease several times over, and the lease moved on all along.
    assert float(built.rsplit(" in ", 1)[1].rstrip("s")) > 3 * workers.lease, built
    assert len(expiries) >= 6 and expiries == sorted(expiries) and len(set(expiries)) >= 4
    assert "marked error" not in workers.log("watcher")


@pytest.mark.timeout(300)
# Hosts share a PostgreSQL; the same rule on SQLite is shown by the kill test.
@pytest.mark.parametrize("fleet", ["postgresql"], indirect=True)
def test_a_frozen_worker_s_run_is_ended_by_another_host_and_it_publishes_nothing(
    fleet: tuple[Fleet, Store], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """A worker that stops renewing (here SIGSTOP: a frozen VM, a lost network) is judged
    dead by a worker on another host once its lease lapsed; thawed, it finds its lease lost
    and neither publishes nor overwrites the run's end."""
    if not can_start_other_host():
        pytest.skip(NO_OTHER_HOST)
    workers, store = fleet
    repo = tmp_path / "frozen"
    make_repo(repo, {"README.md": "# frozen\n"})
    pid = workers.start("frozen")
    run = local_run(store, repo, "echo draft > draft.txt; sleep 60")
    wait_until("the agent running", lambda: store.get_run(run.id).state == RunState.AGENT, 120)
    workers.start("watcher", other_host=True)
    os.killpg(pid, signal.SIGSTOP)
    try:
        ended = wait_until("the run ended", lambda: _finished(store, run.id), 60, 0.2)
        assert ended.state == RunState.ERROR and WORKER_DIED in (ended.reason or "")
        wait_until("its containers gone", lambda: not leftovers(docker_client, store, run.id), 60)
    finally:
        os.killpg(pid, signal.SIGCONT)
    # Thawed, it finds the run gone from under it: its lease renews nothing, its container is
    # gone; whatever it does next, the run's end stays the one the other host gave it.
    time.sleep(workers.lease * 3)
    after = store.get_run(run.id)
    assert (after.state, after.reason) == (ended.state, ended.reason)
    assert [e.message for e in store.events(run.id, kinds=["state"])].count("error") == 1
    assert not store.events(run.id, kinds=["publish"])
    assert workers.procs["frozen"].poll() is None  # it lives on
