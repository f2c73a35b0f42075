"""The production server (webhooks/server.py, Granian) in a real process, with the real store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.test_receiver import SECRET, Receiver, _raw_request, read, real_store, recorded

REPO_ROOT = Path(__file__).resolve().parents[1]

# Started as `trimo serve` starts it: the app built (and the store opened) before the workers
# fork; on_starting / on_exit leave a line each in a file, with the pid they ran in.
SERVE_SCRIPT = """
import os, sys
from pathlib import Path
from bot.settings import Settings
from bot.store import Store
from webhooks.app import create_app
from webhooks.server import serve

data, port, secret, workers, threads = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], \
    int(sys.argv[4]), int(sys.argv[5])
hooks = data / "hooks.log"

def note(what):
    with hooks.open("a") as f:
        f.write(f"{what} {os.getpid()}\\n")

settings = Settings(webhook_secrets=[secret], trigger_label="bug")
store = Store(Store.sqlite_url(data))
serve(
    create_app(settings, store, max_body=1024 * 1024), "127.0.0.1", port,
    workers=workers, threads=threads,
    on_starting=lambda _server: note("starting"), on_exit=lambda _server: note("exit"),
)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], receiver: Receiver, data: Path) -> None:
        self.proc = proc
        self.receiver = receiver
        self.data = data

    def hooks(self) -> list[tuple[str, int]]:
        path = self.data / "hooks.log"
        lines = path.read_text().split("\n") if path.exists() else []
        return [(w, int(pid)) for w, pid in (line.split() for line in lines if line)]

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return out


@pytest.fixture(params=[(2, 1), (1, 4)], ids=["2x1", "1x4"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """`webhooks.server.serve` in a subprocess: (workers, threads) from the parameter."""
    workers, threads = request.param
    port = _free_port()
    store = real_store(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE_SCRIPT,
            str(tmp_path),
            str(port),
            SECRET,
            *map(str, (workers, threads)),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    served = Served(proc, Receiver(f"http://127.0.0.1:{port}", store), tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if served.receiver.healthy():
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield served
    finally:
        served.stop()
        store.close()


def test_workers_record_each_delivery_once_under_concurrency(served: Served) -> None:
    receiver = served.receiver
    body = read("issues.labeled.json")
    ids = [f"g-{i % 40}" for i in range(160)]  # every delivery sent four times, at once
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda d: receiver.post("issues", body, delivery=d), ids))
    codes = [r.status_code for r in replies]
    assert codes.count(202) == 40 and codes.count(200) == 120
    assert all(r.json() == {"status": "duplicate"} for r in replies if r.status_code == 200)
    stored = recorded(receiver.store)
    assert sorted(stored) == sorted({*ids})
    # Each recorded run intent is there once and waits to be processed.
    assert receiver.store.pending_deliveries() == 40
    assert all(len(json.loads(intents)) == 1 for _, _, intents in stored.values())
    out = served.stop()
    assert b"Traceback" not in out, out.decode(errors="replace")


def test_healthz_and_errors_go_through_flask(served: Served) -> None:
    receiver = served.receiver
    health = requests.get(receiver.url + "/healthz", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert requests.get(receiver.url + "/nowhere", timeout=10).status_code == 404
    wrong = requests.get(receiver.url + "/webhooks/github", timeout=10)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    bad = receiver.post("issues", read("issues.labeled.json"), secret="wrong")
    assert bad.status_code == 401 and "webhook secret" in bad.json()["error"]


def test_a_body_over_the_limit_is_refused_from_its_length(served: Served) -> None:
    receiver = served.receiver
    head = (
        "POST /webhooks/github HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "X-GitHub-Event: push\r\nX-GitHub-Delivery: big\r\nX-Hub-Signature-256: sha256=00\r\n"
        f"Content-Length: {30 * 1024 * 1024}\r\n\r\n"
    ).encode()
    status, reply = _raw_request(receiver.url, head, [b"{" * 1024])
    assert status == 413 and b"larger than" in reply
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_start_and_exit_hooks_run_once_in_the_parent(served: Served) -> None:
    assert served.hooks() == [("starting", served.proc.pid)]
    assert served.receiver.post("push", read("push.json")).status_code == 200
    out = served.stop()
    assert served.proc.returncode == 0, out.decode(errors="replace")
    assert served.hooks() == [("starting", served.proc.pid), ("exit", served.proc.pid)]


def test_a_worker_opens_its_own_store_connection(tmp_path: Path) -> None:
    """The store's delivery connection is never used across fork: the child opens its own."""
    store: Any = real_store(tmp_path)
    try:
        assert store.record_delivery("parent", "issues", "labeled", "[]") is True
        parent_conn = store._delivery_writer.conn
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running any cleanup
            ok = store._delivery_writer.conn is None
            ok = ok and store.record_delivery("child", "issues", "labeled", "[]") is True
            ok = ok and store._delivery_writer.conn is not parent_conn
            ok = ok and store.record_delivery("parent", "issues", "labeled", "[]") is False
            os.write(write_end, b"ok" if ok else b"no")
            os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 2)
        os.waitpid(pid, 0)
        os.close(read_end)
        assert answer == b"ok"
        assert store._delivery_writer.conn is parent_conn
        assert store.record_delivery("child", "issues", "labeled", "[]") is False
    finally:
        store.close()
