"""Claims over several engines: N queued runs taken by 4 `trimo worker` processes on 2 Docker
engines sharing one PostgreSQL, against 1 worker on 1 engine (the baseline), in the same run.

Every run is a command agent (`true`) on the warm base image with `network: none`, each on a
pipeline of its own, all queued before the workers start, so the workers race for every claim.
Checked, not assumed: every run succeeded and was claimed exactly once (one move to `preparing`,
one worker), and runs went to both engines. Claims per second: runs / (last claim - first claim);
runs per second: runs / (last finish - first claim), both from the store's timestamps.

The second engine is a dockerd of the benchmark's own (tests/engines.py: its own socket, data
root and bridge; root needed), removed at the end. PostgreSQL: TRIMO_TEST_POSTGRES_URL (a fresh
database is made in it and dropped after).

    python bench/claims.py [--runs 1000] [--baseline-runs 200] [--slots 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.images import ensure_base  # noqa: E402
from bot.states import RunState  # noqa: E402
from bot.store import Run, Store  # noqa: E402
from tests.conftest import empty_database  # noqa: E402
from tests.containers import make_repo  # noqa: E402
from tests.engines import (  # noqa: E402
    queue_runs,
    side_engine,
    start_worker,
    stop_workers,
    wait_finished,
    why_no_second_engine,
    worker_pid,
)

# The engine the session (docker.from_env) uses.
MAIN_URL = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def _seconds(a: datetime | None, b: datetime | None) -> float:
    assert a is not None and b is not None
    return max((b - a).total_seconds(), 1e-9)


def measure(
    tmp: Path, name: str, engines: list[str], runs: int, slots: int, timeout: float
) -> dict[str, object]:
    """Queue `runs`, start one worker per entry of `engines`, wait; the rates and checks."""
    with empty_database("postgresql", tmp / name) as url:
        store = Store(url)
        repo = tmp / name / "repo"
        make_repo(repo, {"README.md": "# bench\n", ".trimo/config.yml": "network:\n  mode: none\n"})
        ids = queue_runs(store, repo, runs, "true", prefix=name)
        workers = [
            start_worker(tmp / name / "data", url, e, slots, tmp / name / f"w{n}.log")
            for n, e in enumerate(engines)
        ]
        try:
            done: list[Run] = wait_finished(store, ids, timeout, workers)
        finally:
            stop_workers(workers)
        failed = [(r.id, r.state.value, r.reason) for r in done if r.state != RunState.SUCCEEDED]
        claims = {
            r.id: sum(1 for e in store.events(r.id, kinds=["state"]) if e.message == "preparing")
            for r in done
        }
        engine_of = {w.pid: w.docker_url for w in workers}
        per_engine = collections.Counter(engine_of[worker_pid(r.worker_id or "")] for r in done)
        per_worker = collections.Counter(worker_pid(r.worker_id or "") for r in done)
        first_claim = min(r.started_at for r in done if r.started_at)
        last_claim = max(r.started_at for r in done if r.started_at)
        last_finish = max(r.finished_at for r in done if r.finished_at)
        store.close()
    return {
        "workers": len(engines),
        "engines": len(set(engines)),
        "runs": runs,
        "succeeded": runs - len(failed),
        "failed": failed[:10],
        "claimed_more_than_once": [i for i, n in claims.items() if n != 1],
        "runs_per_engine": dict(per_engine),
        "runs_per_worker": sorted(per_worker.values()),
        "claims_per_second": round(runs / _seconds(first_claim, last_claim), 2),
        "runs_per_second": round(runs / _seconds(first_claim, last_finish), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--baseline-runs", type=int, default=200)
    parser.add_argument("--slots", type=int, default=2, help="run slots per worker (--workers)")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    if why := why_no_second_engine():
        sys.exit(f"bench/claims.py: {why}")
    if not os.environ.get("TRIMO_TEST_POSTGRES_URL"):
        sys.exit("bench/claims.py: set TRIMO_TEST_POSTGRES_URL to a PostgreSQL it may use")
    main_client = docker.from_env(timeout=600)
    extra = os.environ.get("TRIMO_EXTRA_CA_CERTS")
    ensure_base(main_client, extra_ca_certs=Path(extra) if extra else None)
    with (
        tempfile.TemporaryDirectory(prefix="trimo-bench-claims-") as tmp,
        side_engine(f"b{os.getpid() % 100000}", main_client) as second,
    ):
        started = time.monotonic()
        baseline = measure(
            Path(tmp), "baseline", [MAIN_URL], args.baseline_runs, args.slots, args.timeout
        )
        spread = measure(
            Path(tmp),
            "spread",
            [MAIN_URL, MAIN_URL, second.url, second.url],
            args.runs,
            args.slots,
            args.timeout,
        )
        result = {
            "baseline (1 worker, 1 engine)": baseline,
            "4 workers, 2 engines": spread,
            "claims_per_second_ratio": round(
                float(str(spread["claims_per_second"])) / float(str(baseline["claims_per_second"])),
                2,
            ),
            "runs_per_second_ratio": round(
                float(str(spread["runs_per_second"])) / float(str(baseline["runs_per_second"])), 2
            ),
            "load_average": os.getloadavg(),
            "wall_seconds": round(time.monotonic() - started, 1),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
