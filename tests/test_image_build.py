"""`trimo image build` and `trimo image ls`: content-hash tags, no build when nothing changed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner

from bot.cli import cli
from bot.images import LABEL_HASH, context_hash
from tests.engine_proxy import EngineProxy

pytestmark = pytest.mark.docker

DOCKERFILE = """FROM trimo/base:bookworm
COPY hello.txt /opt/hello.txt
RUN cat /opt/hello.txt
"""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / ".trimo"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    # Unique per test: an image another session left on the engine can never be this one's hit.
    (ctx / "hello.txt").write_text(f"hello {uuid.uuid4().hex}\n")
    return ctx


@pytest.fixture
def tag(docker_client: docker.DockerClient) -> Iterator[str]:
    name = f"trimo-test/image-build:{uuid.uuid4().hex[:8]}"
    yield name
    for img in docker_client.images.list(filters={"label": LABEL_HASH}):
        if any(t.startswith("trimo-test/image-build:") for t in img.tags):
            docker_client.images.remove(img.id, force=True)


def _build(proxy: EngineProxy, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["image", "build", *args], env={"DOCKER_HOST": proxy.url}, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_unchanged_context_is_not_built_again(
    base_image: str, context: Path, tag: str, docker_client: docker.DockerClient
) -> None:
    with EngineProxy() as first:
        out = _build(first, str(context), "--tag", tag)
    assert any(p.split("?")[0].endswith("/build") for p in first.paths("POST")), first.requests
    assert "Step 3/" in out  # progress reached the user
    image_id = docker_client.images.get(tag).id

    with EngineProxy() as second:
        out = _build(second, str(context), "--tag", tag)
    # The engine was asked for no build at all: only look-ups (and the tag).
    assert not [p for p in second.paths("POST") if p.split("?")[0].endswith("/build")]
    assert "up to date" in out
    assert docker_client.images.get(tag).id == image_id

    # A changed file is a new context: built again, new hash.
    before = context_hash(context)
    (context / "hello.txt").write_text("hello again\n")
    assert context_hash(context) != before
    with EngineProxy() as third:
        _build(third, str(context), "--tag", tag)
    assert any(p.split("?")[0].endswith("/build") for p in third.paths("POST"))
    assert docker_client.images.get(tag).id != image_id


def test_failed_build_shows_its_last_lines(base_image: str, context: Path, tag: str) -> None:
    (context / "Dockerfile").write_text(
        "FROM trimo/base:bookworm\nRUN echo 'about to fail' && false\n"
    )
    result = CliRunner().invoke(cli, ["image", "build", str(context), "--tag", tag])
    assert result.exit_code == 1
    assert "about to fail" in result.output
    assert "failed" in result.output


def test_image_ls_lists_trimo_images(base_image: str) -> None:
    result = CliRunner().invoke(cli, ["image", "ls"])
    assert result.exit_code == 0
    assert "trimo/base:bookworm" in result.output
