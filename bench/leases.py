"""Worker crashes: `trimo worker` processes SIGKILLed mid-run at random phases.

Two real worker processes share one store and the Docker engine (the second on "another host"
when `unshare -u` is allowed: a hostname of its own). Each round queues a run that spends a few
seconds in one phase (prepare, image build, agent, publish), kills whichever worker holds it
there, and waits for the run to end and for its containers and networks to go; the killed
worker is started again. Then the same pipeline's next run must succeed.

What it reports: runs lost (not ended, or ended without a reason), containers or networks left,
and the time from the kill to the run's end against the lease length (the baseline: a dead
worker's run cannot be judged before its lease lapses).

    python bench/leases.py [--rounds 20] [--backend postgresql|sqlite] [--lease 2] [--seed N]

PostgreSQL: a fresh database in the cluster named by TRIMO_TEST_POSTGRES_URL, dropped after.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.images import ensure_base  # noqa: E402
from bot.states import RunState  # noqa: E402
from bot.store import Store  # noqa: E402
from tests.conftest import empty_database  # noqa: E402
from tests.fleet import (  # noqa: E402
    PHASES,
    Fleet,
    can_start_other_host,
    kill_round,
    leftovers,
    local_run,
    remove_everything_of,
    wait_until,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--renew", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    client = docker.from_env(timeout=600)
    extra = Path(p) if (p := __import__("os").environ.get("TRIMO_EXTRA_CA_CERTS")) else None
    ensure_base(client, extra_ca_certs=extra)
    other = can_start_other_host()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="trimo-bench-leases-") as tmp:
        data = Path(tmp) / "data"
        with empty_database(args.backend, data) as url:
            store = Store(url)
            fleet = Fleet(data, url, lease=args.lease, renew=args.renew)
            try:
                fleet.start("here")
                fleet.start("there", other_host=other)
                for i in range(args.rounds):
                    phase = rng.choice(PHASES)
                    r = kill_round(fleet, store, client, Path(tmp) / f"repo-{i}-{phase}", phase)
                    rounds.append(r)
                    print(
                        f"round {i + 1:2}: {phase:8} killed {r.victim:5} in {r.state_at_kill:10}"
                        f" → {r.final_state:9} after {r.seconds_to_end:5.1f} s,"
                        f" clean after {r.seconds_to_clean:5.1f} s",
                        flush=True,
                    )
                # Every pipeline a killed run left takes its next run.
                started = time.monotonic()
                nexts = [
                    local_run(store, Path(tmp) / f"repo-{i}-{r.phase}", "echo again > again.txt")
                    for i, r in enumerate(rounds)
                ]
                finals = [
                    wait_until(
                        f"run {n.id} ended",
                        lambda n=n: (x := store.get_run(n.id)).finished and x,  # type: ignore[misc]
                        300,
                        0.2,
                    )
                    for n in nexts
                ]
                next_ok = sum(1 for f in finals if f.state == RunState.SUCCEEDED)
                next_seconds = time.monotonic() - started
                left = [x for n in nexts for x in leftovers(client, store, n.id)]
                left += [x for r in rounds for x in leftovers(client, store, r.run_id)]
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
        "other_host": other,
        "rounds": len(rounds),
        "phases": {p: sum(1 for r in rounds if r.phase == p) for p in PHASES},
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
    }
    print(json.dumps(summary, indent=2))
    if lost or left or next_ok != len(finals):
        print(json.dumps([asdict(r) for r in lost], indent=2))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
