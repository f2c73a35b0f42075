"""Webhook ingest benchmark: Trimo's receiver (Granian + SQLite store) against a Probot 14 peer.

Both servers get the same signed ~11 KB `issues.labeled` deliveries from the shared closed-loop
load generator (loopback only, bounded), alternately, several rounds; the table shows medians.
Trimo does the whole ingest: verify, parse, route to intents, durable dedup + enqueue in SQLite.
Probot verifies, parses, routes and keeps the event in memory.

    /work/venv/bin/python bench/webhook_ingest.py            # see --help for the knobs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRIMO_SHARED_DIR", REPO_ROOT.parent / "shared"))
PEER = SHARED / "bench" / "probot-peer"
LOADGEN = PEER / "loadgen.py"
SECRET = "bench-secret"
# The load generator's payload carries this label; Trimo is told it is the trigger label, so
# every delivery becomes a queued run intent (the Probot app records every labeled event).
TRIGGER_LABEL = "area/search"
TRIMO_PATH = "/webhooks/github"
PROBOT_PATH = "/api/github/webhooks"

SERVERS = ("granian", "gunicorn-sync", "gunicorn-gthread", "gunicorn-gevent")


def serve_gunicorn(app: Any, port: int, workers: int, threads: int, worker_class: str) -> None:
    """`--server gunicorn-*`: the same app on gunicorn, as Trimo served it before Granian."""
    from gunicorn.app.base import BaseApplication

    from webhooks.app import receiver_of

    options = {
        "bind": f"127.0.0.1:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": worker_class,
        "preload_app": True,
        "keepalive": 5,
        "loglevel": "warning",
        "post_fork": lambda _server, _worker: receiver_of(app).after_fork(),
    }

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    Gunicorn().run()


def serve_trimo(data_dir: Path, port: int, workers: int, threads: int, server: str) -> None:
    """Child process: Trimo's receiver as `trimo serve` runs it (or on a gunicorn variant)."""
    sys.path.insert(0, str(REPO_ROOT))
    from bot.settings import Settings
    from bot.store import Store
    from webhooks.app import create_app
    from webhooks.server import serve

    settings = Settings(webhook_secrets=[SECRET], trigger_label=TRIGGER_LABEL)
    app = create_app(settings, Store(Store.sqlite_url(data_dir)))
    if server == "granian":
        serve(app, "127.0.0.1", port, workers=workers, threads=threads)
    else:
        serve_gunicorn(app, port, workers, threads, server.removeprefix("gunicorn-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the server's workers), for CPU accounting."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return pids


@contextmanager
def started(cmd: list[str], port: int, log: Path, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_probot(workdir: Path) -> Path | None:
    """A runnable copy of the Probot peer, or None (with the reason printed) when npm fails."""
    target = workdir / "probot"
    shutil.copytree(PEER, target)
    if shutil.which("node") is None or shutil.which("npm") is None:
        print("Probot skipped: node/npm not found on PATH")
        return None
    try:
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=target,
            check=True,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(
            ["openssl", "genrsa", "-out", "app-key.pem", "2048"],
            cwd=target,
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        tail = getattr(exc, "stderr", b"") or b""
        print(f"Probot skipped: installing the peer failed ({exc}) {tail.decode()[-400:]}")
        return None
    return target


def load(url: str, n: int, concurrency: int, pids: list[int]) -> dict[str, Any]:
    out = subprocess.run(
        [
            *(sys.executable, str(LOADGEN), "--secret", SECRET, "-n", str(n)),
            *("-c", str(concurrency), "--max-seconds", "120"),
            *("--cpu-pids", ",".join(map(str, pids)), url),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50": statistics.median(r["p50_ms"] for r in runs),
        "p99": statistics.median(r["p99_ms"] for r in runs),
        "cpu_ms": statistics.median(1000 * r["server_cpu_s"] / r["completed"] for r in runs),
        "bad": sum(r["non2xx"] + r["socket_errors"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=4000, help="deliveries per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians shown)")
    ap.add_argument("--concurrency", default="1,8,32")
    # webhooks.server.DEFAULT_WORKERS
    ap.add_argument("--workers", type=int, default=1, help="server processes for Trimo")
    ap.add_argument("--threads", type=int, default=1, help="Python threads per process")
    ap.add_argument(
        "--server",
        choices=SERVERS,
        default="granian",
        help="granian: webhooks/server.py (Trimo as shipped); gunicorn-*: for comparison",
    )
    ap.add_argument("--probot-mode", choices=["run", "mw"], default="run")
    ap.add_argument("--no-probot", action="store_true")
    ap.add_argument("--serve-trimo", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_trimo:
        d, port, workers, threads, server = args.serve_trimo
        serve_trimo(Path(d), int(port), int(workers), int(threads), server)
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="trimo-bench-") as tmp:
        workdir = Path(tmp)
        probot = None if args.no_probot else prepare_probot(workdir)
        t_port, p_port = free_port(), free_port()
        trimo_cmd = [sys.executable, __file__, "--serve-trimo", str(workdir / "data"), str(t_port)]
        trimo_cmd += [str(args.workers), str(args.threads), args.server]
        with started(trimo_cmd, t_port, workdir / "trimo.log", cwd=REPO_ROOT) as trimo:
            servers = [("trimo", f"http://127.0.0.1:{t_port}{TRIMO_PATH}", trimo)]
            probot_ctx = None
            if probot is not None:
                env = {
                    **os.environ,
                    "APP_ID": "1",
                    "PRIVATE_KEY_PATH": "app-key.pem",
                    "WEBHOOK_SECRET": SECRET,
                    "HOST": "127.0.0.1",
                    "PORT": str(p_port),
                    "NODE_ENV": "production",
                    "LOG_LEVEL": "warn",
                }
                probot_ctx = started(
                    ["node", "probot_server.mjs", args.probot_mode],
                    p_port,
                    workdir / "probot.log",
                    cwd=probot,
                    env=env,
                )
                proc = probot_ctx.__enter__()
                servers.append(("probot", f"http://127.0.0.1:{p_port}{PROBOT_PATH}", proc))
            try:
                for _name, url, proc in servers:  # warm up (JIT, page cache, pools)
                    load(url, 500, 8, process_tree(proc.pid))
                for round_no in range(args.rounds):
                    for c in levels:
                        order = servers if round_no % 2 == 0 else servers[::-1]
                        for name, url, proc in order:
                            run = load(url, args.requests, c, process_tree(proc.pid))
                            results.setdefault((name, c), []).append(run)
            finally:
                if probot_ctx is not None:
                    probot_ctx.__exit__(None, None, None)
            stored = count_deliveries(workdir / "data" / "trimo.db")
    report(args, levels, results, stored)


def count_deliveries(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])


def report(
    args: argparse.Namespace,
    levels: list[int],
    results: dict[tuple[str, int], list[dict[str, Any]]],
    stored: int,
) -> None:
    print(
        f"\nwebhook ingest, {args.requests} deliveries x {args.rounds} rounds per cell (medians); "
        f"Trimo: {args.server}, {args.workers} workers x {args.threads} threads; "
        f"Probot 14 mode={args.probot_mode}"
    )
    head = f"{'c':>3} | {'server':<7} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | "
    print(head + f"{'CPU ms/req':>10} | {'non-2xx':>7} | Trimo/Probot req/s")
    for c in levels:
        trimo = summarize(results[("trimo", c)])
        probot = summarize(results[("probot", c)]) if ("probot", c) in results else None
        for name, s in (("trimo", trimo), ("probot", probot)):
            if s is None:
                continue
            ratio = f"{trimo['rps'] / probot['rps']:.2f}x" if probot and name == "trimo" else ""
            print(
                f"{c:>3} | {name:<7} | {s['rps']:>8.0f} | {s['p50']:>7.2f} | {s['p99']:>7.2f} | "
                f"{s['cpu_ms']:>10.3f} | {s['bad']:>7} | {ratio}"
            )
    print(f"Trimo deliveries stored (each once): {stored}")
    cmd = [
        "/work/venv/bin/python bench/webhook_ingest.py",
        f"-n {args.requests} --rounds {args.rounds} --concurrency {args.concurrency}",
        f"--workers {args.workers} --threads {args.threads} --server {args.server}",
        f"--probot-mode {args.probot_mode}" + (" --no-probot" if args.no_probot else ""),
    ]
    print("reproduce: " + " ".join(cmd))


if __name__ == "__main__":
    main()
