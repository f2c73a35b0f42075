"""Shared fixtures: the real Docker engine, Trimo's base image, and cleanup of what tests create."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bot.agents import PRESETS
from bot.egress import PROXY_IMAGE
from bot.gateway.sidecar import GATEWAY_IMAGE
from bot.images import BASE_IMAGE, LABEL_CONTEXT
from bot.runtime import LABEL_OWNER, LABEL_ROLE, ROLE_SPARE, SPARE_PREFIX, DockerRuntime
from bot.store import Store
from tests.agent_layers import PREBUILD, ensure_test_base
from tests.containers import TEST_OWNER
from tests.engines import SideEngine, side_engine, why_no_second_engine

REPO_ROOT = Path(__file__).resolve().parents[1]
AGENT_TESTS = "test_agents.py"


# GitHub's published material the tests use (webhook payloads, the OpenAPI subset, the HMAC test
# vector), kept in the repository: see its README.md, and scripts/sync-github-fixtures.
GITHUB_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "github"
MISSING_FIXTURES = (
    "no webhook payloads in {folder}: the repository's copy of GitHub's examples is missing "
    "(restore it with git, or re-copy it with scripts/sync-github-fixtures)"
)


def webhook_payloads() -> list[Path]:
    """Every webhook payload in the fixtures; raises (so collection fails) when there is none,
    rather than letting a test parametrized over them pass with zero cases."""
    found = sorted((GITHUB_FIXTURES / "webhooks").glob("*.json"))
    if not found:
        raise FileNotFoundError(MISSING_FIXTURES.format(folder=GITHUB_FIXTURES / "webhooks"))
    return found


KEEP_IMAGES = {BASE_IMAGE, PROXY_IMAGE, GATEWAY_IMAGE, "debian:bookworm"}
# Agent layers (images/agents/<preset>) take minutes of npm and pip each: the layers built on the
# current base stay between sessions, with the repository images they are built on, so a second
# session on this engine builds none of them.
KEEP_CONTEXTS = set(PRESETS)


def kept_image_ids(client: docker.DockerClient) -> set[str]:
    """The agent layers on the current base and every image below them (by parent)."""
    found = client.images.list(all=True)
    by_id = {img.id: img for img in found}
    try:
        base_id = client.images.get(BASE_IMAGE).id
    except docker.errors.ImageNotFound:
        return set()
    kept: set[str] = set()
    for img in found:
        if (img.labels or {}).get(LABEL_CONTEXT) not in KEEP_CONTEXTS:
            continue
        chain = []
        current = by_id.get(img.id)
        while current is not None and current.id != base_id and len(chain) < 200:
            chain.append(current.id)
            current = by_id.get(current.attrs.get("Parent") or "")
        if current is not None:  # a layer on an older base goes, as it would be rebuilt
            kept.update(chain)
    return kept


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=600)
    client.ping()
    before = {img.id for img in client.images.list(all=True)}
    networks_before = {n.id for n in client.networks.list(filters={"label": "trimo.managed=1"})}
    spare = {"label": f"{LABEL_ROLE}={ROLE_SPARE}"}
    spares_before = {c.id for c in client.containers.list(all=True, filters=spare)}
    yield client
    # Spare proxies the session's runs started and no run took (a taken one went with its run).
    for c in client.containers.list(all=True, filters=spare):
        if c.id not in spares_before and c.name.startswith(SPARE_PREFIX):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True, v=True)
    # Images that runs built during the session (project images of test repositories) go too;
    # the base image stays, as the engine had it or as the session made it.
    kept = kept_image_ids(client)
    for img in client.images.list():
        if img.id in before or img.id in kept or any(t in KEEP_IMAGES for t in img.tags):
            continue
        if any(t.startswith(("trimo/", "trimo-test/", "trimo-ctx:")) for t in img.tags):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(img.id, force=True)
    # Whatever a test left behind under the test owner label goes now.
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={TEST_OWNER}"}):
        c.remove(force=True, v=True)
    # Networks the session's runs made (the engine's egress network included) go as well, once
    # nothing is attached to them; a network the engine had before the session stays.
    for net in client.networks.list(filters={"label": "trimo.managed=1"}):
        if net.id not in networks_before:
            with contextlib.suppress(docker.errors.APIError):
                net.remove()
    client.close()


@pytest.fixture(scope="session")
def runtime(docker_client: docker.DockerClient) -> DockerRuntime:
    return DockerRuntime(docker_client)


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """trimo/base:bookworm, built (or found up to date) once per session.

    With the extra CA certificates `trimo run` would add (TRIMO_EXTRA_CA_CERTS), so the runs a
    test drives reuse this image instead of building another base under it.
    """
    ensure_test_base(docker_client)
    return BASE_IMAGE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The agent tests run last, and the images they need start building now, in the background
    (tests/agent_layers.py): minutes of npm and pip overlap the rest of the suite."""
    agents = [item for item in items if item.path.name == AGENT_TESTS]
    if not agents or config.option.collectonly:
        return
    items[:] = [item for item in items if item.path.name != AGENT_TESTS] + agents
    PREBUILD.start()


# The PostgreSQL cluster scripts/test starts (scripts/setup: ensure_postgres); every store test
# and the end-to-end GitHub App test run on it as well as on SQLite.
POSTGRES_URL = os.environ.get("TRIMO_TEST_POSTGRES_URL")
NO_POSTGRES = (
    "TRIMO_TEST_POSTGRES_URL is not set: scripts/test starts a PostgreSQL cluster and sets it"
)
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason=NO_POSTGRES)),
]


@contextlib.contextmanager
def empty_database(backend: str, data_dir: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file in data_dir, or a fresh PostgreSQL database,
    dropped after."""
    if backend == "sqlite":
        yield Store.sqlite_url(data_dir)
        return
    assert POSTGRES_URL, NO_POSTGRES
    admin_url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"trimo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend in turn."""
    with empty_database(request.param, tmp_path / "data") as url:
        yield url


@pytest.fixture(scope="session")
def second_engine(docker_client: docker.DockerClient, base_image: str) -> Iterator[SideEngine]:
    """A second Docker engine of the session's own (tests/engines.py), holding the main engine's
    base, proxy and Debian images; stopped and removed, with its bridge and data, at the end."""
    reason = why_no_second_engine()
    if reason is not None:
        pytest.skip(reason)
    with side_engine(f"e{os.getpid() % 100000}", docker_client) as engine:
        yield engine


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    """An empty PostgreSQL database, for tests whose processes share one store."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with empty_database("postgresql", tmp_path / "data") as url:
        yield url
