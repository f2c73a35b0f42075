"""Real `trimo worker` processes on one store, killed and restarted as a crash would.

A worker may be started "on another host": in a UTS namespace of its own (`unshare -u`) with
another hostname, so Trimo sees a second host (its worker id, its runs' lease host) while it
shares this machine's Docker engine and database. Used by tests/test_leases.py and
bench/leases.py; every worker is stopped, and every container and network of the store removed,
on close.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import docker
import docker.errors

from bot.runtime import LABEL_RUN, LABEL_STORE
from bot.states import PipelineKind
from bot.store import Run, Store
from bot.worker import dispatch
from tests.containers import make_repo, trimo_free_env

REPO_ROOT = Path(__file__).resolve().parents[1]
OTHER_HOST = "trimo-other-host"
READY = "run slot(s)"  # the line `trimo worker` prints once it claims
# The kill phases: what the run is doing when its worker dies.
PHASES = ("prepare", "build", "agent", "publish")
BUILD_SECONDS = 4
AGENT_SECONDS = 4
PUBLISH_SECONDS = 4

T = TypeVar("T")


def can_start_other_host() -> bool:
    """Whether this machine lets a process have a hostname of its own (root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode == 0


def wait_until(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


class Fleet:
    """`trimo worker` processes sharing one data directory and database."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        *,
        lease: float = 2.0,
        renew: float = 0.4,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        # More TRIMO_* settings of every worker (a GitHub App's: tests/fleet_github.py).
        self.settings = settings or {}
        self.database_url = database_url
        self.lease = lease
        self.renew = renew
        self.logs = data_dir / "worker-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.other_host: dict[str, bool] = {}

    def env(self) -> dict[str, str]:
        env = trimo_free_env()
        env.update(
            {
                "PYTHONPATH": str(REPO_ROOT),
                "TRIMO_DATA_DIR": str(self.data_dir),
                "TRIMO_DATABASE_URL": self.database_url,
                "TRIMO_WORKERS": "1",
                "TRIMO_LEASE_SECONDS": str(self.lease),
                "TRIMO_LEASE_RENEW_SECONDS": str(self.renew),
                **self.settings,
            }
        )
        return env

    def start(self, name: str, *, other_host: bool = False, wait: bool = True) -> int:
        """Start worker `name`; returns its pid (the worker's own: unshare and sh exec it)."""
        command = [sys.executable, "-m", "bot", "worker"]
        if other_host:
            script = f'hostname {OTHER_HOST} && exec "$@"'
            command = ["unshare", "-u", "sh", "-c", script, "sh", *command]
        log = self.logs / f"{name}.log"
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command,
                env=self.env(),
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.other_host[name] = other_host

        def up() -> bool:
            return READY in self.log(name, seen) or proc.poll() is not None

        if wait:
            wait_until(f"worker {name} up", up, 60, 0.1)
            if proc.poll() is not None:
                raise AssertionError(f"worker {name} exited at start:\n{self.log(name, seen)}")
        return proc.pid

    def log(self, name: str, start: int = 0) -> str:
        with open(self.logs / f"{name}.log", "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def holder(self, run: Run) -> str | None:
        """The name of the worker that holds `run`, if one of ours does."""
        if not run.worker_id:
            return None
        pid = run.worker_id.rsplit(":", 2)[1]
        for name, proc in self.procs.items():
            if str(proc.pid) == pid and proc.poll() is None:
                return name
        return None

    def kill(self, name: str) -> None:
        """SIGKILL the worker and what it started (a `git push` under way), as a crash would."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def local_run(store: Store, repo: Path, agent: str, task: str = "Do the work") -> Run:
    """Queue a run on the local repository `repo` (its own pipeline), as `trimo run` would."""
    pipeline = store.get_or_create_pipeline(
        repo=str(repo),
        key=f"local:{repo.name}",
        kind=PipelineKind.LOCAL,
        branch=f"trimo/{repo.name}",
        title=task,
    )
    return dispatch(store, pipeline, trigger="cli", task=task, agent_command=agent)


def phase_repo(path: Path, phase: str, token: str) -> tuple[Path, str]:
    """A repository whose run spends a few seconds in `phase`, and the agent command for it."""
    files = {"README.md": f"# {token}\n"}
    agent = f"echo {token} > done.txt"
    if phase == "build":
        # The token makes the build's context new each time: never a cached image.
        files[".trimo/Dockerfile"] = (
            f"FROM trimo/base:bookworm\nRUN echo 'building {token}' && sleep {BUILD_SECONDS}\n"
        )
    elif phase == "agent":
        agent = f"sleep {AGENT_SECONDS}; {agent}"
    make_repo(path, files)
    if phase == "publish":
        hook = path / ".git" / "hooks" / "pre-receive"
        hook.write_text(f"#!/bin/sh\nsleep {PUBLISH_SECONDS}\n")
        hook.chmod(0o755)
    return path, agent


def in_phase(store: Store, run: Run, phase: str, token: str) -> bool:
    """Whether the run is where its `phase` round kills its worker."""
    now = store.get_run(run.id)
    if now.finished or not now.worker_id:
        return False
    if phase == "prepare":
        return now.state.value == "preparing"
    if phase == "build":
        logs = store.events(run.id, kinds=["log"])
        return any(f"building {token}" in e.message for e in logs) and not store.events(
            run.id, kinds=["image"]
        )
    if phase == "agent":
        return now.state.value == "agent"
    return now.state.value == "publishing"


def leftovers(client: docker.DockerClient, store: Store, run_id: int) -> list[str]:
    """The containers and networks run `run_id` of `store` still has on the engine."""
    labels = {"label": [f"{LABEL_STORE}={store.key}", f"{LABEL_RUN}={run_id}"]}
    # The low-level listing: the high-level one inspects each container, which a reaper may
    # be removing at that moment.
    found = [f"container {c['Names']}" for c in client.api.containers(all=True, filters=labels)]
    found += [f"network {n['Name']}" for n in client.api.networks(filters=labels)]
    return found


def remove_everything_of(client: docker.DockerClient, store: Store) -> None:
    labels = {"label": f"{LABEL_STORE}={store.key}"}
    for c in client.containers.list(all=True, filters=labels):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True, v=True)
    for n in client.networks.list(filters=labels):
        with contextlib.suppress(docker.errors.APIError):
            n.remove()


@dataclass
class Round:
    """One worker killed while its run was in `phase`, and what became of the run."""

    phase: str
    run_id: int
    state_at_kill: str
    victim: str
    victim_other_host: bool
    final_state: str
    reason: str
    seconds_to_end: float  # from the kill to the run's final state
    seconds_to_clean: float  # from the kill to no container or network of the run left
    # A GitHub run's (tests/fleet_github.py): its repository and issue, and the time from the
    # kill to GitHub having taken every report of the run.
    repo: str = ""
    number: int = 0
    seconds_to_reported: float = 0.0


def kill_bound(fleet: Fleet) -> float:
    """How long a killed worker's run may take to end, or to be gone from the engine."""
    return fleet.lease * 3 + 30


def killed_round(
    fleet: Fleet,
    store: Store,
    client: docker.DockerClient,
    *,
    phase: str,
    run_id: int,
    victim: str,
    killed: float,
) -> Round:
    """The round of a run whose worker `victim` was killed at `killed` (monotonic), once the
    run has ended and no container or network of it is left; bounded."""
    bound = kill_bound(fleet)
    at_kill = store.get_run(run_id).state.value

    def ended() -> Run | None:
        now = store.get_run(run_id)
        return now if now.finished else None

    final = wait_until(f"run {run_id} ended", ended, bound, 0.1)
    seconds_to_end = time.monotonic() - killed
    wait_until(
        f"run {run_id}'s containers and networks gone",
        lambda: not leftovers(client, store, run_id),
        bound,
        0.2,
    )
    return Round(
        phase=phase,
        run_id=run_id,
        state_at_kill=at_kill,
        victim=victim,
        victim_other_host=fleet.other_host[victim],
        final_state=final.state.value,
        reason=final.reason or "",
        seconds_to_end=seconds_to_end,
        seconds_to_clean=time.monotonic() - killed,
    )


def kill_round(
    fleet: Fleet, store: Store, client: docker.DockerClient, repo_path: Path, phase: str
) -> Round:
    """Queue a run that spends a few seconds in `phase`, SIGKILL the worker that holds it
    there, and wait (bounded) until the run has ended and its containers and networks are
    gone; the killed worker is started again after."""
    token = uuid.uuid4().hex[:12]
    repo, agent = phase_repo(repo_path, phase, token)
    run = local_run(store, repo, agent)
    wait_until(f"run {run.id} in {phase}", lambda: in_phase(store, run, phase, token), 120, 0.02)
    held = store.get_run(run.id)
    victim = fleet.holder(held)
    assert victim is not None, f"run {run.id} is held by {held.worker_id}, none of ours"
    fleet.kill(victim)
    killed = time.monotonic()
    ended = killed_round(
        fleet, store, client, phase=phase, run_id=run.id, victim=victim, killed=killed
    )
    fleet.start(victim, other_host=fleet.other_host[victim])
    return ended
