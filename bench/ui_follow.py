"""The run pages under load: a run page with a 100,000-line log, and 50 browsers following one
live log while the run writes it.

Both against `trimo ui` as a user starts it (Granian, the real SQLite store), in a subprocess.

1. Page: GET /runs/<id> of a run with 100,000 log lines, against the same page of a run with
   100 lines (the baseline), medians of --rounds requests (target: under 1 s).
2. Followers: the run's own log ingestion — batches of 100 lines written every 50 ms (a busy
   build, 2,000 lines/s), as the engine flushes them — timed without viewers and with 50
   Server-Sent Events followers in another process, alternating; the ratio of the mean time
   `add_logs` takes (target: at most 1.10). The followers must each receive every line.

    python bench/ui_follow.py [--rounds 5] [--followers 50] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.states import LIVE, PipelineKind, RunState  # noqa: E402
from bot.store import Store  # noqa: E402

BATCH = 100
EVERY = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_run(store: Store, name: str, lines: int, state: RunState) -> int:
    pipeline = store.get_or_create_pipeline(
        repo=f"/bench/{name}",
        key=f"local:{name}",
        kind=PipelineKind.LOCAL,
        branch=f"trimo/{name}",
        title=name,
    )
    run = store.create_run(pipeline.id, trigger="bench", task="t")
    store.set_state(run.id, state, expect=LIVE)
    for start in range(0, lines, 5000):
        store.add_logs(
            run.id, [f"{name} line {i} " + "x" * 60 for i in range(start, min(lines, start + 5000))]
        )
    return run.id


def timed_get(url: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = requests.get(url, timeout=30)
        response.raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ingest(store: Store, run_id: int, seconds: float) -> tuple[list[float], int]:
    """Write a batch every EVERY seconds for `seconds`; the time each add_logs took."""
    took = []
    written = 0
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        batch = [f"live {written + i} " + "y" * 60 for i in range(BATCH)]
        started = time.perf_counter()
        store.add_logs(run_id, batch)
        took.append(time.perf_counter() - started)
        written += BATCH
        next_at += EVERY
        time.sleep(max(next_at - time.monotonic(), 0))
    return took, written


def followers_main(url: str, count: int, expect_prefix: str) -> None:
    """Child process: `count` followers of the stream at `url`, each counting log lines until
    told to stop (stdin closes); prints the lowest count."""
    counts = [0] * count
    stop = threading.Event()
    marker = f'data: "{expect_prefix}'.encode()

    def follow(index: int) -> None:
        last = ""
        while not stop.is_set():
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with requests.get(url, stream=True, timeout=60, headers=headers) as r:
                    # Counted on raw chunks: the followers should cost this machine as little
                    # as a browser's C++ would, so the measure is the server's.
                    tail = b""
                    for chunk in r.iter_content(65536):
                        if stop.is_set():
                            return
                        text = tail + chunk
                        cut = text.rfind(b"\n\n") + 2
                        whole, tail = text[:cut], text[cut:]
                        counts[index] += whole.count(marker)
                        ids = whole.rfind(b"id: ")
                        if ids >= 0:
                            last = whole[ids + 4 : whole.index(b"\n", ids)].decode()
            except requests.RequestException:
                time.sleep(0.2)

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    print(min(counts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--followers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--follow", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        followers_main(args.follow[0], int(args.follow[1]), args.follow[2])
        return
    with tempfile.TemporaryDirectory(prefix="trimo-bench-ui-") as tmp:
        data = Path(tmp)
        store = Store(Store.sqlite_url(data))
        small = new_run(store, "small", 100, RunState.SUCCEEDED)
        big = new_run(store, "big", 100_000, RunState.SUCCEEDED)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMO_")}
        env["TRIMO_DATA_DIR"] = str(data)
        env["PYTHONPATH"] = str(ROOT)
        server = subprocess.Popen(
            [sys.executable, "-m", "bot", "ui", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    requests.get(f"{base}/runs", timeout=2)
                    break
                except requests.RequestException:
                    time.sleep(0.2)
            timed_get(f"{base}/runs/{big}", 1)  # warm up
            small_s = timed_get(f"{base}/runs/{small}", args.rounds)
            big_s = timed_get(f"{base}/runs/{big}", args.rounds)
            print(
                f"run page: 100 lines {small_s * 1000:.0f} ms, 100,000 lines {big_s * 1000:.0f} ms "
                f"(ratio {big_s / small_s:.2f}; target under 1 s)"
            )

            quiet: list[float] = []
            watched: list[float] = []
            received: list[tuple[int, int]] = []
            for round_ in range(args.rounds):
                live = new_run(store, f"live{round_}", 0, RunState.AGENT)
                took, _ = ingest(store, live, args.seconds)
                quiet += took
                live = new_run(store, f"watched{round_}", 0, RunState.AGENT)
                child = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--follow",
                        f"{base}/runs/{live}/events",
                        str(args.followers),
                        "live ",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert child.stdout is not None and child.stdin is not None
                child.stdout.readline()
                time.sleep(1.0)  # every follower connected
                took, written = ingest(store, live, args.seconds)
                watched += took
                time.sleep(1.5)  # the last lines reach the followers
                child.stdin.close()
                lowest = int(child.stdout.readline())
                child.wait(timeout=30)
                received.append((lowest, written))
            q, w = statistics.mean(quiet), statistics.mean(watched)
            print(
                f"ingestion, mean add_logs of {BATCH} lines every {EVERY * 1000:.0f} ms: "
                f"alone {q * 1000:.2f} ms, with {args.followers} followers {w * 1000:.2f} ms "
                f"(ratio {w / q:.2f}; target at most 1.10); p90 alone "
                f"{statistics.quantiles(quiet, n=10)[-1] * 1000:.2f} ms, watched "
                f"{statistics.quantiles(watched, n=10)[-1] * 1000:.2f} ms"
            )
            print(
                "every follower received (lowest / written): "
                + ", ".join(f"{lo}/{wr}" for lo, wr in received)
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
            store.close()


if __name__ == "__main__":
    main()
