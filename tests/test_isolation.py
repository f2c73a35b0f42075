"""The article's promise, measured through Trimo: runs of one image share no database or cache.

Five `trimo run`s of the Django example start at once, each on a network of its own. Each
run's Postgres listens on 5432 and its Redis on 6379; each agent writes its own row and key,
waits until all five have written (the test releases them), then reads: each still sees only its
own. Nothing is published on the host, and no two runs share a network.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from pathlib import Path

import docker
import pytest

from bot.images import images_dir
from bot.runtime import LABEL_ROLE, LABEL_RUN, LABEL_STORE
from tests.containers import git
from tests.test_examples import ExampleImages, example_images  # noqa: F401
from tests.test_network import WAIT_RELEASE, release
from tests.test_run_engine import Trimo

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLE = "django-postgres-celery"
RUNS = 5
AGENT = (
    'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc '  # noqa: S608 - fixed test names, not input
    "\"CREATE TABLE IF NOT EXISTS marks (who text); INSERT INTO marks VALUES ('{who}')\" "
    '&& redis-cli -u "$REDIS_URL" SET "mark:{who}" "{who}" >/dev/null && echo "wrote {who}" && '
    + WAIT_RELEASE
    + ' && echo "rows: $(psql "$DATABASE_URL" -tAc "SELECT string_agg(who, \',\') FROM marks")"'
    ' && echo "keys: $(redis-cli -u "$REDIS_URL" --scan --pattern "mark:*" | paste -sd,)"'
    ' && echo "ports: $(psql "$DATABASE_URL" -tAc "SELECT inet_server_port()"),'
    '$(redis-cli -u "$REDIS_URL" CONFIG GET port | tail -n 1)"'
)


def example_repo(dest: Path) -> Path:
    shutil.copytree(
        images_dir() / "examples" / EXAMPLE,
        dest,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "junit.xml"),
    )
    # The agent's work is the proof; the example's own tests are the examples' test's concern.
    (dest / ".trimo" / "config.yml").write_text("network: {mode: allowlist, presets: []}\n")
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "example")
    return dest


def test_five_runs_each_see_only_their_own_row_and_key_on_no_host_port(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    example_images: ExampleImages,  # noqa: F811
) -> None:
    example_images.get(EXAMPLE)  # built once here: five runs at once then reuse it by hash
    trimo = Trimo(tmp_path / "data")
    names = [f"r{i}" for i in range(RUNS)]
    procs: dict[str, subprocess.Popen[str]] = {}
    output: dict[str, list[str]] = {name: [] for name in names}
    wrote: dict[str, threading.Event] = {name: threading.Event() for name in names}

    def follow(name: str) -> None:
        stdout = procs[name].stdout
        assert stdout is not None
        for line in stdout:
            output[name].append(line)
            if f"wrote {name}" in line:
                wrote[name].set()

    started = time.monotonic()
    for name in names:
        repo = example_repo(tmp_path / name)
        procs[name] = trimo.popen(
            "run", "--repo", str(repo), "--task", f"mark {name}", "--agent", AGENT.format(who=name)
        )
        threading.Thread(target=follow, args=(name,), daemon=True).start()
    store = trimo.store()
    try:
        for name in names:
            assert wrote[name].wait(600), f"{name} never wrote:\n" + "".join(output[name][-30:])
        written = time.monotonic() - started
        # All five have written: now each reads, and must find only its own.
        containers = docker_client.containers.list(
            filters={"label": [f"{LABEL_STORE}={store.key}", f"{LABEL_ROLE}=run"]}
        )
        assert len(containers) == RUNS
        networks = [set(c.attrs["NetworkSettings"]["Networks"]) for c in containers]
        for container in containers:
            assert not container.attrs["HostConfig"]["PortBindings"], container.name
            assert not container.ports, f"{container.name} publishes {container.ports}"
        for container in containers:
            release(container)
        for name in names:
            procs[name].wait(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    print(f"\n{RUNS} runs of {EXAMPLE}: all booted and wrote in {written:.1f}s")
    for name in names:
        text = "".join(output[name])
        assert procs[name].returncode == 0, text[-3000:]
        assert f"rows: {name}\n" in text, text[-2000:]
        assert f"keys: mark:{name}\n" in text, text[-2000:]
        assert "ports: 5432,6379\n" in text, text[-2000:]
    # Each run on a network of its own: no network is shared by two runs.
    for i, mine in enumerate(networks):
        for theirs in networks[i + 1 :]:
            assert not mine & theirs, (mine, theirs)
    for run in store.list_runs():
        with contextlib.suppress(docker.errors.NotFound):
            left = docker_client.containers.list(
                all=True, filters={"label": [f"{LABEL_RUN}={run.id}", f"{LABEL_STORE}={store.key}"]}
            )
            assert left == []
