"""The article's promise, measured: containers of one image share no database, cache or port.

Five containers of the Django example start at once. Each one's Postgres listens on 5432 and its
Redis on 6379, each writes its own row and key, and after all have written each still sees only
its own: no shared state, no port conflict, and nothing published on the host.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import docker
import pytest
from docker.models.containers import Container

from bot.images import images_dir
from bot.runtime import LABEL_OWNER
from tests.containers import TEST_OWNER, git, repo_tar
from tests.test_examples import SESSION_TAG, ExampleImages, example_images  # noqa: F401

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLE = "django-postgres-celery"
CONTAINERS = 5
WRITE_MARK = (
    'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc '
    "\"CREATE TABLE IF NOT EXISTS marks (who text); INSERT INTO marks VALUES ('{who}')\" "
    '&& redis-cli -u "$REDIS_URL" SET "mark:{who}" "{who}"'
)
READ_ROWS = 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tAc "SELECT who FROM marks ORDER BY who"'
READ_KEYS = 'redis-cli -u "$REDIS_URL" --scan --pattern "mark:*"'
SERVER_PORTS = (
    'psql "$DATABASE_URL" -tAc "SELECT inet_server_port()" '
    '&& redis-cli -u "$REDIS_URL" CONFIG GET port | tail -n 1'
)

T = TypeVar("T")
R = TypeVar("R")


def all_at_once(work: Callable[[T], R], items: list[T]) -> list[R]:
    """`work` on every item in its own thread; returns when all are done (a barrier)."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(work, items))


def as_agent(container: Container, command: str) -> str:
    """`command` as uid 1000 in a login shell, as Trimo's runner runs the agent and the tests."""
    code, output = container.exec_run(
        ["/bin/bash", "--login", "-c", command], user="1000", workdir="/workspace"
    )
    text = bytes(output).decode("utf-8", "replace").strip()
    assert code == 0, f"{command!r} failed in {container.name} ({code}):\n{text}"
    return text


@pytest.fixture
def checkout_tar(tmp_path: Path) -> bytes:
    repo = tmp_path / EXAMPLE
    shutil.copytree(
        images_dir() / "examples" / EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__")
    )
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "example")
    return repo_tar(repo)


@pytest.fixture
def containers(
    docker_client: docker.DockerClient,
    example_images: ExampleImages,  # noqa: F811
    checkout_tar: bytes,
) -> Iterator[list[Container]]:
    """Five created (not started) containers of the example, each with the checkout uploaded."""
    image = example_images.get(EXAMPLE)
    made: list[Container] = []
    try:
        for index in range(CONTAINERS):
            # The session's owner label: the session's cleanup removes them if this fixture can't.
            container = docker_client.containers.create(
                image.tag,
                # Preboot is run by hand below, so the container only needs to stay up.
                entrypoint=["/usr/bin/tini", "--", "sleep", "infinity"],
                labels={LABEL_OWNER: TEST_OWNER},
                name=f"trimo-test-isolation-{SESSION_TAG}-{index}",
            )
            made.append(container)
            assert container.put_archive("/workspace", checkout_tar)
        yield made
    finally:
        for container in made:
            container.remove(force=True, v=True)


def boot(container: Container) -> float:
    started = time.monotonic()
    container.start()
    code, output = container.exec_run(["/opt/trimo/preboot.sh"], user="root")
    assert code == 0, f"preboot failed in {container.name}:\n{output.decode()}"
    return time.monotonic() - started


def test_five_containers_each_see_only_their_own_row_and_key_on_no_host_port(
    containers: list[Container],
) -> None:
    started = time.monotonic()
    boot_seconds = all_at_once(boot, containers)
    booted = time.monotonic() - started
    names = [f"c{index}" for index in range(CONTAINERS)]
    pairs = list(zip(containers, names, strict=True))

    all_at_once(lambda pair: as_agent(pair[0], WRITE_MARK.format(who=pair[1])), pairs)
    rows = all_at_once(lambda pair: as_agent(pair[0], READ_ROWS), pairs)
    keys = all_at_once(lambda pair: as_agent(pair[0], READ_KEYS), pairs)
    ports = all_at_once(lambda pair: as_agent(pair[0], SERVER_PORTS), pairs)
    total = time.monotonic() - started
    print(
        f"\n{CONTAINERS} containers of {EXAMPLE}: all booted (Postgres, Redis, Celery) in "
        f"{booted:.1f}s wall (each {min(boot_seconds):.1f}-{max(boot_seconds):.1f}s); "
        f"write, read and check done in {total:.1f}s"
    )

    assert rows == names
    assert keys == [f"mark:{name}" for name in names]
    assert ports == ["5432\n6379"] * CONTAINERS
    for container in containers:
        container.reload()
        assert not container.attrs["HostConfig"]["PortBindings"], container.name
        assert not container.ports, f"{container.name} publishes {container.ports}"
