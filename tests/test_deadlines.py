"""Deadlines that cannot die: a store that fails, a worker that is gone, a build that hangs."""

from __future__ import annotations

import io
import logging
import os
import signal
import tarfile
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
from sqlalchemy.exc import OperationalError

from bot.engine import Engine, RunContext
from bot.runtime import LABEL_ROLE, LABEL_RUN, LABEL_STORE, DockerRuntime
from bot.secrets import ServerSecrets
from bot.settings import Settings
from bot.states import PipelineKind, RunState
from bot.store import Run, Store
from bot.worker import WorkerPool, dispatch
from bot.workspace import Remote, Workspace
from tests.containers import extra_ca_certs
from tests.test_run_engine import Trimo, light_repo, wait_for_state

pytestmark = pytest.mark.docker


class FailingStore(Store):
    """A real store whose reads of a run from the watchdog's loop fail (or hang) for a while,
    as when PostgreSQL restarts or its connection is cut, or until the run is being stopped."""

    fail_until = 0.0
    failed = 0
    hang = False
    stopped_while_failing = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.released = threading.Event()

    def get_run(self, run_id: int) -> Run:
        in_loop = threading.current_thread().name == f"run-{run_id}-cancel"
        if in_loop and time.monotonic() < self.fail_until:
            self.failed += 1
            if self.hang:
                self.released.wait(60)
            else:
                raise OperationalError("SELECT runs", {}, Exception("server closed the connection"))
        return super().get_run(run_id)

    def add_event(
        self, run_id: int, kind: str, message: str = "", data: Mapping[str, Any] | None = None
    ) -> None:
        if kind == "stop":
            self.stopped_while_failing = time.monotonic() < self.fail_until
            self.fail_until = 0.0
            self.released.set()
        super().add_event(run_id, kind, message, data)


def _engine(tmp_path: Path, runtime: DockerRuntime, store: Store, timeout: int) -> Engine:
    data = tmp_path / "data"
    return Engine(
        store=store,
        workspace=Workspace(data),
        runtime=runtime,
        owner=f"test-deadlines:{os.getpid()}",
        secrets=ServerSecrets(Settings(data_dir=data)),
        default_timeout=timeout,
        extra_ca_certs=extra_ca_certs(),
    )


def _start(
    store: Store, engine: Engine, repo: Path, agent: str
) -> tuple[threading.Thread, list[Run]]:
    pipeline = store.get_or_create_pipeline(
        repo=str(repo),
        key=f"local:{repo.name}",
        kind=PipelineKind.LOCAL,
        branch=f"trimo/1-{repo.name}",
        title="Slow work",
    )
    queued = dispatch(store, pipeline, trigger="cli", task="Slow work", agent_command=agent)
    claimed = store.claim_run(engine.owner, queued.id)
    assert claimed is not None
    done: list[Run] = []
    thread = threading.Thread(
        target=lambda: done.append(engine.execute(claimed, RunContext(remote=Remote(str(repo))))),
        daemon=True,
    )
    thread.start()
    return thread, done


def _store(tmp_path: Path) -> FailingStore:
    (tmp_path / "data").mkdir(exist_ok=True)
    return FailingStore(Store.sqlite_url(tmp_path / "data"))


@pytest.mark.parametrize("store_does", ["fail", "hang"])
def test_timeout_holds_while_the_store_fails(
    store_does: str,
    tmp_path: Path,
    runtime: DockerRuntime,
    base_image: str,
    docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _store(tmp_path)
    engine = _engine(tmp_path, runtime, store, timeout=4)
    repo = light_repo(tmp_path / "repo")
    caplog.set_level(logging.WARNING, logger="bot.deadline")
    # Every read of the run by the loop fails (or never answers) until it is being stopped.
    store.hang = store_does == "hang"
    store.fail_until = time.monotonic() + 600
    started = time.monotonic()
    thread, done = _start(store, engine, repo, "echo started > progress.txt; sleep 300")
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert done and done[0].state == RunState.TIMED_OUT, done
    assert done[0].reason and done[0].reason.startswith("timed out after 4s")
    assert time.monotonic() - started < 60  # not the agent's 300 s
    assert store.failed > 0 and store.stopped_while_failing
    if store_does == "fail":
        warnings = [r.getMessage() for r in caplog.records]
        assert any("could not read whether it was cancelled" in w for w in warnings), warnings
    assert _left(docker_client, store) == []
    store.close()


def test_cancel_lands_once_the_store_answers_again(
    tmp_path: Path, runtime: DockerRuntime, base_image: str, docker_client: docker.DockerClient
) -> None:
    store = _store(tmp_path)
    engine = _engine(tmp_path, runtime, store, timeout=600)
    repo = light_repo(tmp_path / "repo")
    thread, done = _start(store, engine, repo, "echo draft > draft.txt; sleep 300")
    wait_for_state(store, 1, RunState.AGENT, timeout=60)
    store.fail_until = time.monotonic() + 4
    assert store.request_cancel(1, "stop it")
    asked = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert done and done[0].state == RunState.CANCELLED, done
    # The failures delay the cancel by at most the loop's backoff, never for ever.
    assert time.monotonic() - asked < 4 + 15 + 10
    assert store.failed > 0
    assert _left(docker_client, store) == []
    store.close()


def _left(client: docker.DockerClient, store: Store) -> list[object]:
    """What the run (run 1 of this store) left: containers and networks."""
    mine = {"label": [f"{LABEL_RUN}=1", f"{LABEL_STORE}={store.key}"]}
    return [*client.containers.list(all=True, filters=mine), *client.networks.list(filters=mine)]


def _file_in(container: Any, path: str) -> bytes | None:
    try:
        stream, _ = container.get_archive(path)
    except docker.errors.NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        assert member is not None
        f = tar.extractfile(member)
        return f.read() if f else None


def test_container_stops_itself_at_its_deadline_when_its_worker_is_gone(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient
) -> None:
    trimo = Trimo(tmp_path / "data")
    trimo.env["TRIMO_DEFAULT_TIMEOUT"] = "3s"
    # A short lease: the reaper may judge the run once its container has stopped itself.
    trimo.env.update(TRIMO_LEASE_SECONDS="2", TRIMO_LEASE_RENEW_SECONDS="0.5")
    repo = light_repo(tmp_path / "repo")
    proc = trimo.popen(
        "run", "--repo", str(repo), "--task", "Slow", "--agent", "echo half > half.txt; sleep 300"
    )
    store = trimo.store()
    mine = {"label": [f"{LABEL_RUN}=1", f"{LABEL_STORE}={store.key}"]}
    try:
        wait_for_state(store, 1, RunState.AGENT, timeout=90)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # nobody watches the run from now on
        proc.wait()
    try:
        run_container = next(
            c
            for c in docker_client.containers.list(all=True, filters=mine)
            if c.labels[LABEL_ROLE] == "run"
        )
        # The deadline (3 s) plus the runner's margin (5 s) and its checkpoint.
        until = time.monotonic() + 40
        while time.monotonic() < until:
            run_container.reload()
            if run_container.status == "exited":
                break
            time.sleep(0.5)
        assert run_container.status == "exited", run_container.status
        assert run_container.attrs["State"]["ExitCode"] == 5  # stopped, with a checkpoint
        logs = run_container.logs().decode()
        assert "the run's deadline (8s) has passed and nobody stopped it" in logs
        assert '"event":"deadline"' in logs
        bundle = _file_in(run_container, "/trimo/out/result.bundle")
        assert bundle is not None and bundle.startswith(b"# v2 git bundle")
    finally:
        # Dead once its lease lapsed (2 s after the kill, long before the container stopped).
        lapsed = store.get_run(1).lease_expires_at
        if lapsed is not None:
            time.sleep(max(0.0, (lapsed - datetime.now(UTC)).total_seconds()) + 0.5)
        r = trimo("image", "ls")  # the next command reaps what the dead worker left
    assert r.returncode == 0, r.stderr
    assert docker_client.containers.list(all=True, filters=mine) == []
    assert docker_client.networks.list(filters=mine) == []


def test_image_build_over_its_deadline_fails_the_run_with_its_last_lines(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient
) -> None:
    trimo = Trimo(tmp_path / "data")
    marker = f"fetching-toolchain-{os.getpid()}-{time.monotonic_ns()}"
    repo = light_repo(
        tmp_path / f"slow-build-{os.getpid()}",
        extra={
            ".trimo/Dockerfile": f"FROM trimo/base:bookworm\nRUN echo {marker} && sleep 300\n",
        },
    )
    started = time.monotonic()
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Anything",
        "--agent",
        "echo AGENT-RAN",
        TRIMO_IMAGE_BUILD_TIMEOUT="4s",
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - started < 60
    assert "took longer than 4s and was stopped" in r.stdout
    assert marker in r.stdout  # the build's last lines
    assert "AGENT-RAN" not in r.stdout
    run = trimo.store().list_runs()[0]
    assert run.state == RunState.ERROR and run.container_id is None
    assert "image build failed" in (run.reason or "") and marker in (run.error or "")
    # The engine cancelled the build: its step's container is gone, nothing was tagged.
    until = time.monotonic() + 15
    while time.monotonic() < until and build_step_containers(docker_client, marker):
        time.sleep(0.5)
    assert build_step_containers(docker_client, marker) == []
    assert docker_client.images.list(name=f"trimo/{repo.name}") == []


def build_step_containers(client: docker.DockerClient, marker: str) -> list[str]:
    """The containers of an image build whose step runs the command holding `marker`."""
    # One listing call: containers that come and go between a list and an inspect are fine.
    return [str(c["Id"]) for c in client.api.containers(all=True) if marker in c["Command"]]


class ClaimFailingStore(Store):
    """A real store whose first claims fail, as while PostgreSQL restarts."""

    failures_left = 3

    def claim_run(self, worker_id: str, run_id: int | None = None, **lease: Any) -> Run | None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise OperationalError("UPDATE runs", {}, Exception("the database system is starting"))
        return super().claim_run(worker_id, run_id, **lease)


def test_a_worker_keeps_claiming_through_store_failures(
    tmp_path: Path, runtime: DockerRuntime, base_image: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "data").mkdir()
    store = ClaimFailingStore(Store.sqlite_url(tmp_path / "data"))
    engine = _engine(tmp_path, runtime, store, timeout=60)
    repo = light_repo(tmp_path / "repo")
    pipeline = store.get_or_create_pipeline(
        repo=str(repo), key="local:repo", kind=PipelineKind.LOCAL, branch="trimo/1-repo", title="x"
    )
    run = dispatch(store, pipeline, trigger="cli", task="x", agent_command="echo ok > ok.txt")
    caplog.set_level(logging.WARNING, logger="bot.worker")
    pool = WorkerPool(
        engine, store, lambda r: RunContext(remote=Remote(str(repo))), size=1, poll_seconds=0.1
    )
    loop = threading.Thread(target=pool.run_forever, daemon=True)
    loop.start()
    try:
        wait_for_state(store, run.id, RunState.SUCCEEDED, timeout=90)
    finally:
        pool.drain(grace=30)
        loop.join(timeout=10)
    assert store.failures_left == 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("could not claim a run (OperationalError" in line for line in lines) == 3, lines
    store.close()
