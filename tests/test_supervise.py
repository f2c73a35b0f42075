"""`trimo serve` keeps its worker alive and drains it on SIGTERM: real processes, real runs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from bot.runtime import LABEL_RUN, LABEL_STORE
from bot.states import PipelineKind, RunState
from bot.store import Store
from bot.supervisor import WorkerSupervisor
from bot.worker import dispatch
from tests.containers import git, trimo_free_env
from tests.github_fake import app_private_key
from tests.test_deadlines import build_step_containers
from tests.test_run_engine import light_repo, wait_for_state
from tests.test_serve import SECRET, _free_port

pytestmark = pytest.mark.docker

# Started afresh, the agent works for long; resumed from its checkpoint, it finishes at once.
RESUMABLE = (
    "if [ -f progress.txt ]; then echo resumed >> progress.txt; "
    "else echo started > progress.txt; sleep 300; fi"
)


class Serve:
    """A real `trimo serve` (or `trimo worker`) on its own data directory, its output kept."""

    def __init__(self, tmp_path: Path, command: str = "serve", **env: str) -> None:
        self.data = tmp_path / "data"
        self.env = trimo_free_env()
        self.env.update(
            TRIMO_DATA_DIR=str(self.data),
            TRIMO_APP_ID="1",
            TRIMO_PRIVATE_KEY=app_private_key(),
            TRIMO_WEBHOOK_SECRET=SECRET,
            TRIMO_PORT=str(_free_port()),
            **env,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", command],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 60, count: int = 1) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if sum(text in line for line in self.lines) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in:\n{self.output()}")

    def worker_pids(self) -> list[int]:
        """The `trimo worker` children of this serve process."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"worker" in cmdline:
                found.append(int(entry.name))
        return found

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        for pid in self.worker_pids():
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def store(self) -> Store:
        return Store(Store.sqlite_url(self.data))


def _queue(store: Store, repo: Path, agent: str) -> int:
    pipeline = store.get_or_create_pipeline(
        repo=str(repo),
        key=f"local:{repo.name}",
        kind=PipelineKind.LOCAL,
        branch=f"trimo/1-{repo.name}",
        title="Work",
    )
    return dispatch(store, pipeline, trigger="cli", task="Work", agent_command=agent).id


@pytest.fixture
def serving(tmp_path: Path, base_image: str) -> Iterator[list[Serve]]:
    """Every process a test starts; whatever is still running at the end is killed."""
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.kill()
            # What the killed worker left (a run's container, proxy, network) goes with the next
            # command, as a person's next `trimo` would remove it.
            subprocess.run(
                [sys.executable, "-m", "bot", "image", "ls"],
                env=s.env,
                capture_output=True,
                timeout=120,
                check=False,
            )


def _run_containers(client: docker.DockerClient, store: Store, run_id: int) -> list[object]:
    mine = {"label": [f"{LABEL_RUN}={run_id}", f"{LABEL_STORE}={store.key}"]}
    return [*client.containers.list(all=True, filters=mine), *client.networks.list(filters=mine)]


def test_a_killed_worker_is_restarted_and_runs_the_next_run(
    tmp_path: Path, serving: list[Serve]
) -> None:
    serve = Serve(tmp_path)
    serving.append(serve)
    serve.wait_for_line("run slot(s) on the Docker engine")
    (first,) = serve.worker_pids()
    os.kill(first, signal.SIGKILL)
    serve.wait_for_line(f"the worker (pid {first}) exited with -9")
    serve.wait_for_line("run slot(s) on the Docker engine", count=2)
    assert serve.worker_pids() and first not in serve.worker_pids()
    store = serve.store()
    run_id = _queue(store, light_repo(tmp_path / "repo"), "echo fine > fine.txt")
    wait_for_state(store, run_id, RunState.SUCCEEDED, timeout=90)
    assert serve.terminate() == 0, serve.output()


def test_sigterm_lets_a_run_within_the_grace_finish(
    tmp_path: Path, serving: list[Serve], docker_client: docker.DockerClient
) -> None:
    serve = Serve(tmp_path, TRIMO_DRAIN_GRACE="60s")
    serving.append(serve)
    serve.wait_for_line("run slot(s) on the Docker engine")
    store = serve.store()
    repo = light_repo(tmp_path / "repo")
    run_id = _queue(store, repo, "sleep 4; echo done > done.txt")
    wait_for_state(store, run_id, RunState.AGENT, timeout=90)
    started = time.monotonic()
    assert serve.terminate() == 0, serve.output()
    assert time.monotonic() - started < 60
    run = store.get_run(run_id)
    assert run.state == RunState.SUCCEEDED, (run, serve.output())
    assert git(repo, "show", f"trimo/1-{repo.name}:done.txt") == "done"
    assert _run_containers(docker_client, store, run_id) == []


def test_sigterm_requeues_a_run_past_the_grace_and_another_worker_resumes_it(
    tmp_path: Path, serving: list[Serve], docker_client: docker.DockerClient
) -> None:
    serve = Serve(tmp_path, TRIMO_DRAIN_GRACE="2s")
    serving.append(serve)
    serve.wait_for_line("run slot(s) on the Docker engine")
    store = serve.store()
    repo = light_repo(tmp_path / "repo")
    run_id = _queue(store, repo, RESUMABLE)
    wait_for_state(store, run_id, RunState.AGENT, timeout=90)
    time.sleep(1)  # the agent has written its progress
    started = time.monotonic()
    assert serve.terminate() == 0, serve.output()
    assert time.monotonic() - started < 60, serve.output()
    assert f"run(s) {run_id} requeued" in serve.output()
    run = store.get_run(run_id)
    assert run.state == RunState.QUEUED, (run, serve.output())
    assert run.worker_id is None
    queued = [e for e in store.events(run_id, kinds=["state"]) if e.message == "queued"]
    assert len(queued) == 2  # when it was made, and when it was put back
    assert "shutting down" in str(queued[-1].data), queued[-1]
    assert _run_containers(docker_client, store, run_id) == []
    # The checkpoint is on the pipeline's branch, for the next worker to start from.
    branch = f"trimo/1-{repo.name}"
    assert git(repo, "show", f"{branch}:progress.txt") == "started"

    worker = Serve(tmp_path, "worker")
    serving.append(worker)
    wait_for_state(store, run_id, RunState.SUCCEEDED, timeout=90)
    assert store.get_run(run_id).reason is None
    assert git(repo, "show", f"{branch}:progress.txt") == "started\nresumed"
    assert worker.terminate() == 0, worker.output()
    assert _run_containers(docker_client, store, run_id) == []


def test_sigterm_during_an_image_build_stops_the_build_and_requeues_the_run(
    tmp_path: Path, serving: list[Serve], docker_client: docker.DockerClient
) -> None:
    serve = Serve(tmp_path, TRIMO_DRAIN_GRACE="1s")
    serving.append(serve)
    serve.wait_for_line("run slot(s) on the Docker engine")
    store = serve.store()
    marker = f"slow-build-{os.getpid()}-{time.monotonic_ns()}"
    repo = light_repo(
        tmp_path / marker,
        extra={".trimo/Dockerfile": f"FROM trimo/base:bookworm\nRUN echo {marker} && sleep 300\n"},
    )
    run_id = _queue(store, repo, "true")
    until = time.monotonic() + 90
    while time.monotonic() < until and not build_step_containers(docker_client, marker):
        time.sleep(0.2)
    assert build_step_containers(docker_client, marker), serve.output()
    started = time.monotonic()
    assert serve.terminate() == 0, serve.output()
    assert time.monotonic() - started < 30, serve.output()
    run = store.get_run(run_id)
    assert run.state == RunState.QUEUED, (run, serve.output())
    assert "shutting down" in (run.reason or "")
    until = time.monotonic() + 15
    while time.monotonic() < until and build_step_containers(docker_client, marker):
        time.sleep(0.5)
    assert build_step_containers(docker_client, marker) == []
    assert _run_containers(docker_client, store, run_id) == []


def test_a_worker_that_keeps_dying_is_retried_with_a_capped_pause_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.supervisor")
    supervisor = WorkerSupervisor(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        os.environ,
        drain_seconds=5,
        backoff_first=0.05,
        backoff_max=0.2,
    ).start()
    try:
        until = time.monotonic() + 20
        while time.monotonic() < until and supervisor.restarts < 7:
            time.sleep(0.05)
    finally:
        supervisor.stop()
    assert supervisor.restarts >= 7
    lines = [r.getMessage() for r in caplog.records]
    assert any("exited with 3" in line and "restarting it in 0.05s" in line for line in lines)
    # The pause doubles, then stays at its cap.
    assert any("restarting it in 0.1s" in line for line in lines)
    assert sum("restarting it in 0.2s" in line for line in lines) >= 3
    assert not any("restarting it in 0.4s" in line for line in lines)
    assert any("failed 5 times in a row" in line for line in lines), lines
    restarts = supervisor.restarts
    time.sleep(0.5)
    assert supervisor.restarts == restarts  # stopped means stopped
