"""Workers: who owns a run, dispatching (one live run per pipeline), claiming, and the reaper.

A worker is a process; its id names the host, the pid and the process's start time, so a reused
pid is never mistaken for the worker that died. Runs and containers carry that id, and each run
a lease its worker renews (bot/leases.py). The reaper finishes what a dead worker left: runs
whose lease expired become `error` with the reason, and their containers go.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import docker.errors

from bot.deadline import describe_error
from bot.engine import Engine, Observer, RunContext
from bot.errors import NoSuchRunError
from bot.leases import lease_dead
from bot.runtime import ENGINE_UNREACHABLE, DockerRuntime, Leftover
from bot.states import ACTIVE, RunMode, RunState
from bot.store import Pipeline, Run, Store

log = logging.getLogger(__name__)

WORKER_DIED = (
    "the worker running it ({owner}) stopped renewing its lease (last until {expired}); "
    "it was ended by the worker {by}"
)
SUPERSEDED = "superseded by run {run_id}"
DRAINING = "its worker ({owner}) is shutting down"
# After the grace, how long a run has to checkpoint, publish and be requeued (the container's
# stop grace, copying the bundle out, a push) before the worker exits without it.
CHECKPOINT_SECONDS = 60
CLAIM_BACKOFF_MAX_SECONDS = 30.0
CLAIM_FAILED = "could not claim a run ({error}); trying again in {wait:g}s"


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # Field 22 (starttime) follows the parenthesised command, which may contain spaces.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the worker `owner` still runs; None when it is on another host (its lease tells)."""
    try:
        host, pid, start = owner.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if not pid.isdigit():
        return False
    return _process_start(int(pid)) == start and start != "0"


def reap(
    store: Store, runtime: DockerRuntime | None, *, any_host: bool = False, me: str | None = None
) -> list[str]:
    """End the runs of dead workers and remove the containers of ended runs; says what it did.

    A run is dead when its lease expired and its worker is shown gone (`lease_dead`). A worker
    (`any_host`) ends such runs whatever host they ran on; a `trimo` command (the default) only
    those of its own host, whose process it can check. Containers go only from `runtime`'s
    engine, and only for runs whose engine that is: a run of another engine keeps its
    containers until a worker there finds the run ended.
    """
    said: list[str] = []
    here = socket.gethostname()
    by = me or worker_id()
    for run in store.expired_runs():
        if not any_host and run.lease_host != here:
            continue
        if not lease_dead(run, owner_alive, here):
            continue
        expired = (
            run.lease_expires_at.isoformat(timespec="seconds") if run.lease_expires_at else "?"
        )
        reason = WORKER_DIED.format(owner=run.worker_id, expired=expired, by=by)
        if store.reap_run(run.id, reason):
            said.append(f"run {run.id}: marked error (its worker {run.worker_id} is gone)")
    if runtime is None:
        return said

    def is_dead(leftover: Leftover) -> bool:
        if leftover.run_id is None:
            return owner_alive(leftover.owner) is False
        try:
            run = store.get_run(leftover.run_id)
        except NoSuchRunError:
            # Not ours to judge: only a provably dead owner frees it.
            return owner_alive(leftover.owner) is False
        if leftover.owner != run.worker_id:
            return True  # left by an earlier attempt, since requeued: nobody runs it any more
        if run.engine_id not in (None, runtime.engine_id):
            return False  # the run's engine is another one: its workers judge its containers
        return run.state.finished

    for leftover in runtime.reap(store.key, is_dead):
        said.append(
            f"removed {leftover.kind} {leftover.container_id[:12]} of run {leftover.run_id}"
        )
    return said


def dispatch(
    store: Store,
    pipeline: Pipeline,
    *,
    trigger: str,
    task: str,
    mode: RunMode = RunMode.AGENT,
    sender: str | None = None,
    instructions: str | None = None,
    agent_command: str | None = None,
    head_sha: str | None = None,
    delivery_key: str | None = None,
) -> Run:
    """Queue a run on `pipeline`; a live run there is superseded (cancelled, and says by what).
    `delivery_key`: the run is the delivery's, from the same transaction (Store.create_run)."""
    run = store.create_run(
        pipeline.id,
        trigger=trigger,
        task=task,
        mode=mode,
        sender=sender,
        instructions=instructions,
        agent_command=agent_command,
        head_sha=head_sha,
        delivery_key=delivery_key,
    )
    for old in store.live_runs(pipeline.id):
        if old.id == run.id:
            continue
        store.update_run(old.id, superseded_by=run.id)
        store.cancel_run(old.id, SUPERSEDED.format(run_id=run.id))
    return run


@dataclass
class WorkerPool:
    """Claims queued runs and executes them, `size` at a time, until stopped."""

    engine: Engine
    store: Store
    context_for: Callable[[Run], RunContext]
    observer_for: Callable[[Run], Observer | None] = lambda run: None
    size: int = 2
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._loop_done = threading.Event()
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="trimo-run")
        self._busy = threading.Semaphore(self.size)
        self._futures: dict[Future[Run | None], int] = {}
        self._futures_lock = threading.Lock()

    def run_forever(self) -> None:
        try:
            self._loop()
        finally:
            self._loop_done.set()

    def _loop(self) -> None:
        # A store that fails (PostgreSQL restarting) costs a log line and a pause, never the
        # loop: a worker whose process lives on but claims nothing would never be restarted.
        failures = 0
        # A dead worker's run is ended within about a lease and a half of its last renewal.
        reap_every = self.engine.leases.terms.length.total_seconds() / 2
        last_reap = -float("inf")
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_reap >= reap_every:
                    self._reap()
                    last_reap = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - tried again at the next turn
                log.warning(
                    "could not reap dead workers' runs (%s); trying again", describe_error(exc)
                )
            if not self._busy.acquire(timeout=self.poll_seconds):
                continue
            if self._stop.is_set():
                self._busy.release()
                return
            try:
                run = self.engine.claim()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive the store's failures
                self._busy.release()
                failures += 1
                wait = min(self.poll_seconds * 2**failures, CLAIM_BACKOFF_MAX_SECONDS)
                log.warning(CLAIM_FAILED.format(error=describe_error(exc), wait=wait))
                self._stop.wait(wait)
                continue
            failures = 0
            if run is None:
                self._busy.release()
                self._stop.wait(self.poll_seconds)
                continue
            if self._stop.is_set():  # stopped while claiming: the run waits for the next worker
                self.store.set_state(
                    run.id, RunState.QUEUED, expect=RunState.PREPARING, owner=self.engine.owner
                )
                self._busy.release()
                return
            try:
                future = self._pool.submit(self._execute, run)
            except RuntimeError:  # stopping: leave the run for the next worker
                self.store.set_state(
                    run.id, RunState.QUEUED, expect=RunState.PREPARING, owner=self.engine.owner
                )
                self._busy.release()
                return
            with self._futures_lock:
                self._futures[future] = run.id
            future.add_done_callback(self._forget)

    def _forget(self, future: Future[Run | None]) -> None:
        with self._futures_lock:
            self._futures.pop(future, None)

    def live(self) -> list[int]:
        """The ids of the runs this pool executes now."""
        with self._futures_lock:
            return sorted(self._futures.values())

    def _execute(self, run: Run) -> Run | None:
        try:
            return self.engine.execute(run, self.context_for(run), self.observer_for(run))
        except Exception:
            log.exception("run %s: could not execute", run.id)
            self.store.set_state(
                run.id,
                RunState.ERROR,
                expect=ACTIVE,
                owner=self.engine.owner,
                reason="internal error in the worker",
            )
            return None
        finally:
            self._busy.release()

    def drain(self, grace: float, checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[int]:
        """Claim nothing more; give live runs `grace` seconds to finish, then checkpoint and
        requeue the rest. Returns the ids of the runs requeued."""
        self._stop.set()
        self._loop_done.wait(timeout=self.poll_seconds * 4 + 30)
        if self.live():
            log.warning(
                "draining: %d live run(s) get %ss to finish before they are requeued",
                len(self.live()),
                f"{grace:g}",
            )
        self._wait_idle(grace)
        requeued: list[int] = []
        why = DRAINING.format(owner=self.engine.owner)
        until = time.monotonic() + checkpoint_seconds
        # Asked again each turn: a run between its claim and its first step is reached once its
        # engine knows it.
        while (live := self.live()) and time.monotonic() < until:
            for run_id in live:
                if run_id not in requeued and self.engine.requeue(run_id, why):
                    log.warning("run %s: checkpointing it and putting it back in the queue", run_id)
                    requeued.append(run_id)
            self._wait_idle(min(0.5, max(0.0, until - time.monotonic())))
        if left := self.live():
            log.error("drained with runs still executing (they are left to the reaper): %s", left)
        self._pool.shutdown(wait=False)
        return requeued

    def _wait_idle(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while self.live() and time.monotonic() < until:
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def _reap(self) -> None:
        # An engine that is restarting leaves its leftovers to the next round; the worker goes on.
        try:
            for line in reap(self.store, self.engine.runtime, any_host=True, me=self.engine.owner):
                log.info("reaper: %s", line)
        except (docker.errors.DockerException, *ENGINE_UNREACHABLE) as exc:
            log.warning("the reaper could not reach the Docker engine: %s", exc)
        except Exception:
            # The next round tries again; claiming goes on meanwhile.
            log.exception("the reaper failed")

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._pool.shutdown(wait=wait)
