"""Several engines: `trimo worker --docker-url` per engine, workers as real processes sharing one
PostgreSQL, and a run whose engine restarts under it."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from bot.engine import Engine, RunContext
from bot.runtime import EGRESS_NETWORK, LABEL_RUN, LABEL_STORE, DockerRuntime
from bot.secrets import ServerSecrets
from bot.settings import Settings
from bot.states import RunState
from bot.store import Run, Store
from bot.worker import WorkerPool, worker_id
from bot.workspace import Remote, Workspace
from tests.containers import extra_ca_certs, make_repo
from tests.engines import (
    SideEngine,
    WorkerProcess,
    needs_second_engine,
    queue_runs,
    start_worker,
    stop_workers,
    trimo_env,
    wait_finished,
    worker_pid,
)

pytestmark = [pytest.mark.docker, needs_second_engine]

# The engine the session (docker.from_env) uses.
MAIN_URL = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def _wait_state(store: Store, run_id: int, state: RunState, seconds: float) -> Run:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.state == state:
            return run
        assert not run.finished, f"run {run_id} ended {run.state}: {run.reason}"
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never reached {state}: {store.get_run(run_id).state}")


def _labelled(client: docker.DockerClient, store: Store, run_id: int) -> list[str]:
    """What the run has on an engine: its containers and networks, by name."""
    labels = {"label": [f"{LABEL_RUN}={run_id}", f"{LABEL_STORE}={store.key}"]}
    containers = [c.name for c in client.containers.list(all=True, filters=labels)]
    networks = [n.name for n in client.networks.list(filters=labels)]
    return containers + networks


def test_engine_restart_mid_run_ends_it_with_the_reason_and_the_next_run_succeeds(
    second_engine: SideEngine,
    docker_client: docker.DockerClient,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    make_repo(repo, {"README.md": "# r\n", ".trimo/config.yml": "timeout: 5m\n"})
    store = Store(postgres_url)
    side = second_engine.client()
    worker = start_worker(tmp_path / "data", postgres_url, second_engine.url, 1, tmp_path / "w.log")
    try:
        [first] = queue_runs(store, repo, 1, "sleep 120", prefix="restart")
        _wait_state(store, first, RunState.AGENT, 120)
        # The run, its proxy and its network are on the worker's engine, none on the main one.
        on_side = _labelled(side, store, first)
        assert any(name.endswith("-proxy") for name in on_side), on_side
        assert len(on_side) >= 3, on_side  # container, proxy, network
        assert _labelled(docker_client, store, first) == []
        assert side.networks.list(names=[EGRESS_NETWORK])

        second_engine.restart()

        [ended] = wait_finished(store, [first], 150, [worker])
        assert ended.state == RunState.ERROR
        assert ended.reason == (
            f"the Docker engine at {second_engine.url} restarted during the agent phase and "
            "stopped the run's container with it; nothing was published: run it again"
        )
        # Reported like any failure: `trimo runs show` says why.
        shown = subprocess.run(
            [sys.executable, "-m", "bot", "runs", "show", str(first)],
            env=trimo_env(tmp_path / "data", postgres_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "restarted during the agent phase" in shown.stdout, shown.stdout + shown.stderr
        # The engine came back: what the run made there is gone.
        assert _labelled(side, store, first) == []

        [second] = queue_runs(store, repo, 1, "true", prefix="after-restart")
        [after] = wait_finished(store, [second], 150, [worker])
        assert after.state == RunState.SUCCEEDED, after.reason
        assert after.worker_id == ended.worker_id  # the same worker, on the restarted engine
    finally:
        stop_workers([worker])
        side.close()
        store.close()


def test_runs_spread_over_four_workers_on_two_engines_each_claimed_once(
    second_engine: SideEngine,
    docker_client: docker.DockerClient,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    count, slots = 24, 2
    repo = tmp_path / "repo"
    # A Dockerfile of the repository's own, new to both engines (a name of this session alone,
    # not the test's folder, which the next session has too): each engine builds it for its
    # runs, and reuses it.
    make_repo(
        repo,
        {
            "README.md": "# r\n",
            ".trimo/config.yml": "network:\n  mode: none\n",
            ".trimo/Dockerfile": f"FROM trimo/base:bookworm\nRUN echo {uuid.uuid4().hex} > /r\n",
        },
    )
    store = Store(postgres_url)
    run_ids = queue_runs(store, repo, count, "echo hello", prefix="spread")
    data = tmp_path / "data"  # one host: one mirror cache for its workers
    engines = [MAIN_URL, MAIN_URL, second_engine.url, second_engine.url]
    workers: list[WorkerProcess] = []
    try:
        for n, url in enumerate(engines):
            workers.append(start_worker(data, postgres_url, url, slots, tmp_path / f"w{n}.log"))
        runs = wait_finished(store, run_ids, 240, workers)
    finally:
        stop_workers(workers)

    try:
        assert [r.state for r in runs] == [RunState.SUCCEEDED] * count, [
            (r.id, r.reason) for r in runs if r.state != RunState.SUCCEEDED
        ]
        # Each run claimed exactly once: one move to `preparing`, by one worker.
        for run in runs:
            claims = [e for e in store.events(run.id, kinds=["state"]) if e.message == "preparing"]
            assert len(claims) == 1, (run.id, [(e.message, e.data) for e in claims])
        engine_of = {w.pid: w.docker_url for w in workers}
        per_engine = collections.Counter(engine_of[worker_pid(r.worker_id or "")] for r in runs)
        assert set(per_engine) == {MAIN_URL, second_engine.url}, per_engine
        # No worker ever ran more runs at once than its slots.
        for pid in engine_of:
            spans = [
                (r.started_at, r.finished_at) for r in runs if worker_pid(r.worker_id or "") == pid
            ]
            for start, _ in spans:
                assert start is not None
                at_once = sum(1 for s, f in spans if s and f and s <= start < f)
                assert at_once <= slots, (pid, at_once)
        # Images are built where the run runs: the repository's image is on both engines; only
        # runs that started before their engine had it built it, every later one reused it.
        built = [
            (engine_of[worker_pid(r.worker_id or "")], e)
            for r in runs
            for e in store.events(r.id, kinds=["image"])
            if (e.data or {}).get("built") is True
        ]
        assert 2 <= len(built) <= slots * len(workers), [e.message for _, e in built]
        assert {url for url, _ in built} == {MAIN_URL, second_engine.url}
        clients = {MAIN_URL: docker_client, second_engine.url: second_engine.client()}
        for url, event in built:  # on the engine of the run that built it
            clients[url].images.get(str((event.data or {})["tag"]))
        # One host, one mirror cache: a single bare mirror of the repository for all four.
        assert len(list((data / "mirrors").glob("*.git"))) == 1
    finally:
        store.close()
        _remove_images_of(runs, [docker_client, second_engine.client()])


def _remove_images_of(runs: list[Run], clients: list[docker.DockerClient]) -> None:
    """The repository images the runs used, on every engine that has them."""
    tags = {r.image_tag for r in runs if r.image_tag}
    for client in clients:
        for tag in tags:
            with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                # By id: the content-hash tag beside it goes too.
                client.images.remove(client.images.get(tag).id, force=True)


def test_a_worker_whose_engine_is_down_at_a_reaper_round_claims_runs_once_it_is_back(
    second_engine: SideEngine, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    make_repo(repo, {"README.md": "# r\n", ".trimo/config.yml": "network:\n  mode: none\n"})
    data = tmp_path / "data"
    store = Store(Store.sqlite_url(data))
    engine = Engine(
        store,
        Workspace(data),
        DockerRuntime(second_engine.client(), url=second_engine.url),
        owner=worker_id(),
        secrets=ServerSecrets(Settings(data_dir=data)),
        extra_ca_certs=extra_ca_certs(),
    )
    pool = WorkerPool(engine, store, lambda run: RunContext(remote=Remote(str(repo))), size=1)
    loop = threading.Thread(target=pool.run_forever, daemon=True)
    try:
        with second_engine.down():
            loop.start()  # its first act is a reaper round, which finds no engine
            time.sleep(2)
            assert loop.is_alive()
        [run_id] = queue_runs(store, repo, 1, "true", prefix="after-outage")
        [run] = wait_finished(store, [run_id], 120)
        assert run.state == RunState.SUCCEEDED, run.reason
        assert loop.is_alive()
    finally:
        pool.stop()
        loop.join(timeout=30)
        store.close()
