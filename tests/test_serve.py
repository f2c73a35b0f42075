"""`trimo serve` as a user starts it: settings checked at start, webhooks answered, clean stop."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import GITHUB_FIXTURES
from tests.containers import trimo_free_env
from tests.github_fake import app_private_key

SECRET = "serve-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return trimo_free_env(TRIMO_DATA_DIR=str(tmp_path / "data"), **extra)


def test_serve_refuses_to_start_without_the_app_id(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bot", "serve"],
        env=_env(tmp_path, TRIMO_WEBHOOK_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "TRIMO_APP_ID" in r.stderr


def test_serve_refuses_a_broken_private_key(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bot", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(
            tmp_path, TRIMO_APP_ID="1", TRIMO_PRIVATE_KEY="not a key", TRIMO_WEBHOOK_SECRET=SECRET
        ),
    )
    assert r.returncode != 0
    assert "TRIMO_PRIVATE_KEY" in r.stderr and "not a key" not in r.stderr


def test_worker_names_the_engine_it_cannot_reach_and_claims_nothing(tmp_path: Path) -> None:
    from bot.states import PipelineKind, RunState
    from bot.store import Store
    from bot.worker import dispatch

    store = Store(Store.sqlite_url(tmp_path / "data"))
    pipeline = store.get_or_create_pipeline(
        repo=str(tmp_path), key="local:x", kind=PipelineKind.LOCAL, branch="trimo/x", title="x"
    )
    queued = dispatch(store, pipeline, trigger="cli", task="x", agent_command="true")
    missing = f"unix://{tmp_path}/no-engine-here.sock"
    r = subprocess.run(
        [sys.executable, "-m", "bot", "worker", "--docker-url", missing, "--workers", "1"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"no Docker engine answers at {missing}" in r.stderr
    assert "--docker-url" in r.stderr  # and how to point it elsewhere
    assert store.get_run(queued.id).state == RunState.QUEUED  # left for a worker with an engine
    store.close()


def test_worker_refuses_zero_run_slots(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bot", "worker", "--workers", "0"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--workers" in r.stderr and "0 is not in the range 1<=x<=64" in r.stderr


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.docker
@pytest.mark.parametrize("listen", ["environment", "flags"])
def test_serve_answers_signed_webhooks_and_stops_cleanly(
    tmp_path: Path, base_image: str, listen: str
) -> None:
    """Where it listens: TRIMO_HOST / TRIMO_PORT, or --host / --port, which win over them."""
    port = _free_port()
    if listen == "environment":
        env_host, env_port, args = "127.0.0.1", port, []
    else:
        # The environment names another address, which must stay unused.
        env_host, env_port = "127.0.0.2", _free_port()
        args = ["--host", "127.0.0.1", "--port", str(port)]
    env = _env(
        tmp_path,
        TRIMO_APP_ID="1",
        TRIMO_PRIVATE_KEY=app_private_key(),
        TRIMO_WEBHOOK_SECRET=SECRET,
        TRIMO_HOST=env_host,
        TRIMO_PORT=str(env_port),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    worker_up = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("trimo worker"):
                worker_up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            raise AssertionError("trimo serve did not come up")
        body = (GITHUB_FIXTURES / "webhooks" / "ping.json").read_bytes()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": "serve-ping-1",
            "X-Hub-Signature-256": sig,
        }
        r = requests.post(f"{url}/webhooks/github", data=body, headers=headers, timeout=5)
        assert r.status_code == 200 and "zen" in r.json()
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
        assert (
            requests.post(
                f"{url}/webhooks/github", data=body, headers=headers, timeout=5
            ).status_code
            == 401
        )
        assert json.loads(requests.get(f"{url}/healthz", timeout=5).text)["status"] == "ok"
        assert worker_up.wait(60), "".join(lines)  # the worker runs beside the receiver
        assert len(_processes_with(f"TRIMO_PORT={env_port}")) >= 3  # server, http worker, worker
        if listen == "flags":
            assert _refused(env_host, env_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    # Nothing of the two processes is left behind: no process runs with this server's settings.
    assert _processes_with(f"TRIMO_PORT={env_port}") == []


def _processes_with(env_entry: str) -> list[int]:
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if env_entry.encode() in environ:
            found.append(int(proc_dir.name))
    return found


def test_serve_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bot", "serve", "--port", "70000"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--port" in r.stderr and "70000" in r.stderr


def _worker_children(env_entry: str) -> list[int]:
    """The `trimo worker` processes among those with this environment entry."""
    found = []
    for pid in _processes_with(env_entry):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in args:
            found.append(pid)
    return found


def _healthz(url: str, deadline: float) -> requests.Response:
    while time.monotonic() < deadline:
        try:
            return requests.get(f"{url}/healthz", timeout=1)
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("trimo serve did not come up")


@pytest.mark.docker
def test_serve_without_its_worker_needs_no_engine_and_sees_the_workers_beside_it(
    tmp_path: Path,
) -> None:
    """deploy/compose.yml: the receiver holds no engine; workers elsewhere share its database
    and their status folder, and /healthz counts them."""
    port = _free_port()
    common = {
        "TRIMO_APP_ID": "1",
        "TRIMO_PRIVATE_KEY": app_private_key(),
        "TRIMO_WEBHOOK_SECRET": SECRET,
        "TRIMO_DATABASE_URL": f"sqlite:///{tmp_path / 'shared' / 'trimo.db'}",
        "TRIMO_PORT": str(port),
    }
    serve_env = _env(tmp_path, **common, DOCKER_HOST=f"unix://{tmp_path / 'no-engine.sock'}")
    serve_env["TRIMO_DATA_DIR"] = str(tmp_path / "serve")
    serve = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--no-worker"],
        env=serve_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker: subprocess.Popen[str] | None = None
    url = f"http://127.0.0.1:{port}"
    try:
        r = _healthz(url, time.monotonic() + 60)
        assert r.status_code == 503
        assert r.json()["status"] == "no worker reported in the last 30 s"
        assert _worker_children(f"TRIMO_PORT={port}") == []
        # A worker with a data folder of its own, whose status folder is the receiver's (the
        # volume both mount in compose.yml), on the engine the tests use.
        worker_dir = tmp_path / "worker"
        worker_dir.mkdir()
        (tmp_path / "serve" / "workers").mkdir(parents=True, exist_ok=True)
        (worker_dir / "workers").symlink_to(tmp_path / "serve" / "workers")
        worker_env = _env(tmp_path, **common)
        worker_env["TRIMO_DATA_DIR"] = str(worker_dir)
        worker = subprocess.Popen(
            [sys.executable, "-m", "bot", "worker"],
            env=worker_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while (r := _healthz(url, deadline)).status_code != 200 and time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()[0]
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        [seen] = r.json()["workers"]
        assert seen["worker"].split(":")[1] == str(worker.pid) and seen["engine"] is True
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        serve.send_signal(signal.SIGTERM)
        output = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0, output
    assert worker.returncode == 0
    assert _processes_with(f"TRIMO_PORT={port}") == []
