"""The images the agent tests need, built in the background while the rest of the suite runs.

Each agent layer is minutes of apt, npm or pip on a bare machine. Built inside the agent tests,
one after another, those minutes add up on the suite's wall time; started as soon as collection
shows agent tests are selected, the builds overlap the other tests, which mostly wait on the
engine. The agent tests run last (conftest orders them) and wait for the builds here, bounded, so
a build that hangs fails them instead of the session.

The images are built with the functions the engine uses on the same sample repository, so each
agent test's run finds its image by content hash and builds nothing.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import docker
import pytest

from bot import images
from bot.agents import PRESETS
from bot.agents.layer import build_agent_layer
from bot.gateway.sidecar import gateway_image
from bot.runtime import DockerRuntime, engine_client
from bot.sample import make_sample_repo
from tests.containers import extra_ca_certs, git
from tests.locks import engine_key, machine_lock

# One configuration for every preset (the preset is the run's `--agent`): the repository image,
# whose context holds this file, is then built once, and each agent layer once on top of it.
CONFIG = """test:
  command: python3 -m pytest --junitxml="${{TRIMO_OUT:-.}}/junit.xml"
  junit: junit.xml
network: none
{extra}"""

WAIT_SECONDS = 1500.0


def ensure_test_base(client: docker.DockerClient) -> str:
    """trimo/base:bookworm with the extra CA certificates `trimo run` would add, built once.

    By whoever comes first (this module's thread or the `base_image` fixture of the first test
    that needs it, in any of the session's processes); the others find it up to date.
    """
    with machine_lock(f"base-{engine_key()}"):
        return images.ensure_base(client, extra_ca_certs=extra_ca_certs()).tag


def sample(path: Path, extra: str = "") -> Path:
    """The sample repository with the agent tests' configuration committed."""
    repo = make_sample_repo(path)
    (repo / ".trimo" / "config.yml").write_text(CONFIG.format(extra=extra))
    git(repo, "commit", "-qam", "Trimo: network none")
    return repo


class Prebuild:
    """The base, the gateway, the sample's repository image and every preset's layer on it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._build, name="agent-layers", daemon=True)
            self._thread.start()

    def _build(self) -> None:
        started = time.monotonic()
        try:
            # One process of the session builds them; any other waits here, then finds each
            # image by its content hash.
            with machine_lock(f"agent-layers-{engine_key()}"):
                self._build_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the tests that wait
            self._error = exc
        self.seconds = time.monotonic() - started

    def _build_all(self) -> None:
        # This thread runs while pytest sets and unsets PYTEST_CURRENT_TEST: a client that read
        # the environment on each call would fail now and then (engine_client says why).
        client = engine_client(timeout=600)
        try:
            ensure_test_base(client)
            gateway_image(DockerRuntime(client), extra_ca_certs=extra_ca_certs())
            with tempfile.TemporaryDirectory(prefix="trimo-agent-layers-") as tmp:
                repo = sample(Path(tmp) / "repo")
                project = images.build_image(
                    client, repo / ".trimo", dockerfile="Dockerfile", name="repo"
                )
            for preset in PRESETS:
                build_agent_layer(client, project.tag, preset)
        finally:
            client.close()

    def wait(self) -> None:
        """Block until the builds are done (bounded); fail the calling test if they failed."""
        self.start()
        assert self._thread is not None
        self._thread.join(WAIT_SECONDS)
        if self._thread.is_alive():
            pytest.fail(f"the agent layers were still building after {WAIT_SECONDS:.0f}s")
        if self._error is not None:
            raise self._error


PREBUILD = Prebuild()
