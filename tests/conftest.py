"""Shared fixtures: the real Docker engine, Trimo's base image, and cleanup of what tests create."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from bot.images import BASE_IMAGE, ensure_base
from bot.runtime import LABEL_OWNER, DockerRuntime
from tests.containers import TEST_OWNER

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The team's shared/ folder: TRIMO_SHARED_DIR, else `../shared` from the repository root
    (where CI puts it), else beside the local repository this checkout was cloned from."""
    override = os.environ.get("TRIMO_SHARED_DIR")
    if override:
        return Path(override)
    beside = REPO_ROOT.parent / "shared"
    if beside.is_dir():
        return beside
    origin = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        return Path(origin).resolve().parent / "shared"
    return beside


KEEP_IMAGES = {BASE_IMAGE, "debian:bookworm"}


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=600)
    client.ping()
    before = {img.id for img in client.images.list(all=True)}
    yield client
    # Images that runs built during the session (project images of test repositories) go too;
    # the base image stays, as the engine had it or as the session made it.
    for img in client.images.list():
        if img.id in before or any(t in KEEP_IMAGES for t in img.tags):
            continue
        if any(t.startswith(("trimo/", "trimo-test/", "trimo-ctx:")) for t in img.tags):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(img.id, force=True)
    # Whatever a test left behind under the test owner label goes now.
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={TEST_OWNER}"}):
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
    extra = os.environ.get("TRIMO_EXTRA_CA_CERTS")
    ensure_base(docker_client, extra_ca_certs=Path(extra) if extra else None)
    return BASE_IMAGE
