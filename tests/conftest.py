"""Shared fixtures: the real Docker engine, Trimo's base image, and cleanup of what tests create."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bot.agents import PRESETS
from bot.egress import PROXY_IMAGE
from bot.gateway.sidecar import GATEWAY_IMAGE
from bot.images import BASE_IMAGE, HASH_REPO, LABEL_CONTEXT
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


class EngineCleanup:
    """What the session made on the engine goes at its end; what the engine had stays.

    Taken once per session by the process that is not a pytest-xdist worker (the only process
    without xdist, the controller with it): a worker finishing early must not remove images or
    networks another worker's tests still use.
    """

    def __init__(self) -> None:
        self.images: set[str] = set()
        self.tags: set[str] = set()
        self.networks: set[str] = set()
        self.spares: set[str] = set()
        self.seen = False
        self.used = False  # a test of the session (in any of its processes) used the engine
        self.since = 0

    def snapshot(self) -> None:
        try:
            client = docker.from_env(timeout=60)
            client.ping()
        except (docker.errors.DockerException, OSError):
            return  # no engine: the session's tests that need one fail on their own
        try:
            found = client.images.list(all=True)
            self.images = {img.id for img in found}
            self.tags = {tag for img in found for tag in img.tags}
            managed = client.networks.list(filters={"label": "trimo.managed=1"})
            self.networks = {n.id for n in managed}
            spare = {"label": f"{LABEL_ROLE}={ROLE_SPARE}"}
            self.spares = {c.id for c in client.containers.list(all=True, filters=spare)}
            self.since = int(time.time()) - 1
            self.seen = True
        finally:
            client.close()

    def clean(self) -> list[str]:
        """Remove what the session made; returns the shared tags it moved (see `moved_tags`)."""
        if not (self.seen and self.used):
            return []  # a session that never touched the engine leaves it alone
        client = docker.from_env(timeout=600)
        try:
            moved = self.moved_tags(client)
            self._clean(client)
        finally:
            client.close()
        return moved

    def moved_tags(self, client: docker.DockerClient) -> list[str]:
        """The kept tags (trimo/base:bookworm, the proxy, the gateway) the session pointed at
        more than one image, from the engine's own events.

        Each test process builds these with the session's settings and reuses them by content
        hash. A Trimo process or engine started with other settings (no extra CA certificates,
        say) builds another image under the same tag, and a run in another process then finds
        its spare proxy or its repository image out of date: rare failures far from the cause.
        """
        ids: dict[str, set[str]] = {}
        events = client.events(
            since=self.since,
            until=int(time.time()) + 1,
            filters={"type": "image", "event": "tag"},
            decode=True,
        )
        for event in events:
            name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
            if name in KEEP_IMAGES:
                ids.setdefault(name, set()).add(event["Actor"]["ID"])
        return [
            f"{tag} was built as {len(found)} different images: a Trimo process or engine a test "
            "started had other image settings than the session's (tests/containers.py: "
            "trimo_free_env, extra_ca_certs)"
            for tag, found in sorted(ids.items())
            if len(found) > 1
        ]

    def _clean(self, client: docker.DockerClient) -> None:
        # Spare proxies the session's runs started and no run took (a taken one went with its
        # run).
        spare = {"label": f"{LABEL_ROLE}={ROLE_SPARE}"}
        for c in client.containers.list(all=True, filters=spare):
            if c.id not in self.spares and c.name.startswith(SPARE_PREFIX):
                with contextlib.suppress(docker.errors.APIError):
                    c.remove(force=True, v=True)
        # Images that runs built during the session (project images of test repositories) go
        # too; the base image stays, as the engine had it or as the session made it.
        kept = kept_image_ids(client)
        for img in client.images.list():
            if img.id in kept:
                # A kept layer keeps its content-hash tag, by which the next session finds it;
                # the names the session's tests gave it go.
                for tag in set(img.tags) - self.tags - KEEP_IMAGES:
                    if not tag.startswith(f"{HASH_REPO}:"):
                        with contextlib.suppress(docker.errors.APIError):
                            client.images.remove(tag)
                continue
            if img.id in self.images or any(t in KEEP_IMAGES for t in img.tags):
                continue
            ours = any(t.startswith(("trimo/", "trimo-test/", "trimo-ctx:")) for t in img.tags)
            # Untagged: a build that lost its tag to another build of the same context at the
            # same moment (two workers on one engine), or one a test stopped.
            lost = not img.tags and "dev.trimo.contract" in (img.labels or {})
            if ours or lost:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(img.id, force=True)
        # Networks the session's runs made (the engine's egress network included) go as well,
        # once nothing is attached to them; a network the engine had before the session stays.
        for net in client.networks.list(filters={"label": "trimo.managed=1"}):
            if net.id not in self.networks:
                with contextlib.suppress(docker.errors.APIError):
                    net.remove()


ENGINE_CLEANUP = EngineCleanup()


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def engine_used(config: pytest.Config) -> None:
    """This process's tests use the engine: the session's clean-up is due (told to the
    controller by a pytest-xdist worker)."""
    ENGINE_CLEANUP.used = True
    if is_xdist_worker(config):
        config.workeroutput["docker_used"] = True  # type: ignore[attr-defined]


def pytest_sessionstart(session: pytest.Session) -> None:
    if not is_xdist_worker(session.config) and not session.config.option.collectonly:
        ENGINE_CLEANUP.snapshot()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A pytest-xdist worker is done: did its tests use the engine?"""
    if getattr(node, "workeroutput", {}).get("docker_used"):
        ENGINE_CLEANUP.used = True


def pytest_sessionfinish(session: pytest.Session) -> None:
    if is_xdist_worker(session.config):
        return
    moved = ENGINE_CLEANUP.clean()
    if moved:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            for line in moved:
                reporter.write_line(f"ERROR: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def docker_client(request: pytest.FixtureRequest) -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=600)
    client.ping()
    engine_used(request.config)
    yield client
    # Whatever this process's tests left behind under its test owner label goes now.
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={TEST_OWNER}"}):
        with contextlib.suppress(docker.errors.APIError):
            c.remove(force=True, v=True)
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


# The modules that take longest, first: with the suite spread over processes a module at a time
# (scripts/test: pytest-xdist, --dist loadfile), a long one started last would finish alone.
# A module missing here only starts later; the agent tests always go last.
LONGEST_FIRST = (
    "test_github_app.py",
    "test_lease_workers.py",
    "test_run_engine.py",
    "test_engines.py",
    "test_examples.py",
    "test_network.py",
    "test_base_image.py",
    "test_publish_secrets.py",
    "test_deadlines.py",
)


def module_rank(item: pytest.Item) -> int:
    name = item.path.name
    if name == AGENT_TESTS:
        return len(LONGEST_FIRST) + 1
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first and the agent tests last; the images the agent tests need
    start building now, in the background (tests/agent_layers.py): minutes of npm and pip
    overlap the rest of the suite."""
    if any(item.get_closest_marker("docker") for item in items):
        engine_used(config)
    items.sort(key=module_rank)  # stable: each module's own order stays
    if config.option.collectonly or not any(item.path.name == AGENT_TESTS for item in items):
        return
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
