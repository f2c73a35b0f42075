"""Worker crashes: `trimo worker` processes SIGKILLed mid-run at random phases.

Two real worker processes share one store and the Docker engine (the second on "another host"
when `unshare -u` is allowed: a hostname of its own). Each round queues a run that spends a few
seconds in one phase (prepare, image build, agent, publish), kills whichever worker holds it
there, and waits for the run to end and for its containers and networks to go; the killed
worker is started again. Then the same pipeline's next run must succeed.

What it reports: runs lost (not ended, or ended without a reason), containers or networks left,
and the time from the kill to the run's end against the lease length (the baseline: a dead
worker's run cannot be judged before its lease lapses).

With --github, each run is a GitHub App's: an issue labelled `trimo` through the webhook
receiver, its reports going to the fake GitHub on a socket (tests/fleet_github.py), its next
run a `/trimo retry`. A publish round then kills either in the push or while GitHub holds the
pull request's or the check run's create of the run's end. After the rounds, once the outbox is
empty, it reports per run what GitHub shows: one tracking comment, no duplicate check run, every
check run completed, and no request the OpenAPI description rejects.

    python bench/leases.py [--github] [--rounds 20] [--backend postgresql|sqlite] [--lease 2]
                           [--seed N]

PostgreSQL: a fresh database in the cluster named by TRIMO_TEST_POSTGRES_URL, dropped after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.images import ensure_base  # noqa: E402
from bot.states import RunState  # noqa: E402
from bot.store import Run, Store  # noqa: E402
from tests.conftest import empty_database  # noqa: E402
from tests.fleet import (  # noqa: E402
    PHASES,
    Fleet,
    Round,
    can_start_other_host,
    kill_round,
    leftovers,
    local_run,
    remove_everything_of,
    wait_until,
)
from tests.fleet_github import (  # noqa: E402
    HELD_WRITES,
    GitHub,
    audit,
    github_kill_round,
    reports_settled,
    retry_issue,
    served_github,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--renew", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--github", action="store_true", help="GitHub App runs, not local ones")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    client = docker.from_env(timeout=600)
    extra = Path(p) if (p := os.environ.get("TRIMO_EXTRA_CA_CERTS")) else None
    ensure_base(client, extra_ca_certs=extra)
    other = can_start_other_host()
    rounds: list[Round] = []
    kept: Path | None = None
    github_summary: dict[str, Any] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trimo-bench-leases-") as tmp:
        data = Path(tmp) / "data"
        with empty_database(args.backend, data) as url, ExitStack() as stack:
            store = Store(url)
            github = stack.enter_context(served_github(data, url, store)) if args.github else None
            fleet = Fleet(
                data,
                url,
                lease=args.lease,
                renew=args.renew,
                settings=github.worker_env() if github else None,
            )
            try:
                fleet.start("here")
                fleet.start("there", other_host=other)
                for i in range(args.rounds):
                    phase = rng.choice(PHASES)
                    work = Path(tmp) / f"repo-{i}-{phase}"
                    if github is None:
                        r = kill_round(fleet, store, client, work, phase)
                    else:
                        held = rng.choice([None, *HELD_WRITES]) if phase == "publish" else None
                        r = github_kill_round(fleet, store, client, github, work, phase, held)
                    rounds.append(r)
                    print(
                        f"round {i + 1:2}: {r.phase:22} killed {r.victim:5} in"
                        f" {r.state_at_kill:10} → {r.final_state:9} after"
                        f" {r.seconds_to_end:5.1f} s, clean after {r.seconds_to_clean:5.1f} s"
                        + (f", reported after {r.seconds_to_reported:5.1f} s" if github else ""),
                        flush=True,
                    )
                # Every pipeline a killed run left takes its next run.
                started = time.monotonic()
                nexts: list[Run] = []
                finals: list[Run] = []
                # A GitHub run's retry comes with a delivery to process and its answers: queued
                # two at a time (the fleet's run slots), not twenty at once.
                batch = len(rounds) if github is None else len(fleet.procs)
                for first in range(0, len(rounds), batch):
                    some = list(enumerate(rounds))[first : first + batch]
                    if github is None:
                        queued = [
                            local_run(store, Path(tmp) / f"repo-{i}-{r.phase}", "echo a > a.txt")
                            for i, r in some
                        ]
                    else:
                        queued = [
                            retry_issue(github, store, r.repo, r.number, after=r.run_id)
                            for _, r in some
                        ]
                    nexts += queued
                    finals += [
                        wait_until(
                            f"run {n.id} ended",
                            lambda n=n: (x := store.get_run(n.id)).finished and x,  # type: ignore[misc]
                            300,
                            0.2,
                        )
                        for n in queued
                    ]
                next_ok = sum(1 for f in finals if f.state == RunState.SUCCEEDED)
                for f in finals:
                    if f.state != RunState.SUCCEEDED:
                        problems.append(f"next run {f.id} ended {f.state.value}: {f.reason}")
                        problems += [f"  {e.kind}: {e.message}" for e in store.events(f.id)[-8:]]
                next_seconds = time.monotonic() - started
                left = [x for n in nexts for x in leftovers(client, store, n.id)]
                left += [x for r in rounds for x in leftovers(client, store, r.run_id)]
                if github is not None:
                    run_ids = [r.run_id for r in rounds] + [n.id for n in nexts]
                    github_summary, found = _github_audit(github, store, run_ids, started)
                    problems += found
                if problems:
                    kept = _keep_logs(fleet, seed)
            except BaseException:
                _keep_logs(fleet, seed)
                raise
            finally:
                fleet.close()
                remove_everything_of(client, store)
                store.close()
    lost = [r for r in rounds if not (r.final_state == "succeeded" or r.reason)]
    ends = [r.seconds_to_end for r in rounds]
    cleans = [r.seconds_to_clean for r in rounds]
    summary = {
        "seed": seed,
        "backend": args.backend,
        "mode": "github" if args.github else "local",
        "other_host": other,
        "rounds": len(rounds),
        "phases": dict(Counter(r.phase for r in rounds)),
        "states_at_kill": sorted({r.state_at_kill for r in rounds}),
        "ended_error_with_reason": sum(1 for r in rounds if r.final_state == "error" and r.reason),
        "ended_succeeded": sum(1 for r in rounds if r.final_state == "succeeded"),
        "lost": len(lost),
        "left_on_engine": left,
        "lease_seconds": args.lease,
        "kill_to_end_median_s": round(statistics.median(ends), 2),
        "kill_to_end_max_s": round(max(ends), 2),
        "kill_to_end_over_lease": round(statistics.median(ends) / args.lease, 2),
        "kill_to_clean_median_s": round(statistics.median(cleans), 2),
        "kill_to_clean_max_s": round(max(cleans), 2),
        "next_runs_succeeded": f"{next_ok}/{len(finals)} in {next_seconds:.0f} s",
        "reaped_by_other_host": sum(1 for r in rounds if not r.victim_other_host and other),
        **github_summary,
    }
    if args.github:
        reported = [r.seconds_to_reported for r in rounds]
        summary["kill_to_reported_median_s"] = round(statistics.median(reported), 2)
        summary["kill_to_reported_max_s"] = round(max(reported), 2)
    print(json.dumps(summary, indent=2))
    if lost or left or next_ok != len(finals) or problems:
        print(json.dumps([asdict(r) for r in lost], indent=2))
        print(f"workers' logs: {kept}")
        print("\n".join(problems))
        return 1
    return 0


def _keep_logs(fleet: Fleet, seed: int) -> Path:
    """The workers' logs, kept past the temporary directory for a person to read."""
    kept = Path(tempfile.gettempdir()) / f"trimo-bench-leases-logs-{seed}"
    shutil.copytree(fleet.logs, kept, dirs_exist_ok=True)
    print(f"workers' logs kept in {kept}", file=sys.stderr)
    return kept


def _github_audit(
    github: GitHub, store: Store, run_ids: list[int], started: float
) -> tuple[dict[str, Any], list[str]]:
    """Once every report went out: what GitHub shows of each run, and what is wrong with it."""
    problems: list[str] = []
    try:
        wait_until("every report sent", lambda: reports_settled(store, run_ids), 300, 0.5)
    except AssertionError as exc:
        problems.append(str(exc))
    settled = time.monotonic() - started
    found = audit(github, store, run_ids)
    for run_id, shown in found.runs.items():
        print(
            f"run {run_id:3} {shown['repo']:24} {shown['state']:9}"
            f" tracking comments {shown['tracking_comments']}"
            f" check runs {', '.join(shown['check_runs']) or '-'}"
        )
    checks = [c for shown in found.runs.values() for c in shown["check_runs"]]
    summary = {
        "github_runs": len(found.runs),
        "tracking_comments_per_run": sorted({s["tracking_comments"] for s in found.runs.values()}),
        "check_runs": len(checks),
        "check_runs_completed": sum(1 for c in checks if c.startswith("completed/")),
        "pull_requests": len(github.fake.pulls),
        "spec_violations": len(github.fake.violations),
        "reports_settled_after_s": round(settled, 1),
        "github_problems": found.problems,
    }
    return summary, problems + found.problems


if __name__ == "__main__":
    sys.exit(main())
