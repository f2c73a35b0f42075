"""`trimo image build` and `trimo image ls`: content-hash tags, no build when nothing changed."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner

from bot.cli import cli
from bot.errors import ImageBuildError
from bot.images import LABEL_HASH, BuildResult, build_image, context_hash
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


def test_runs_that_need_one_new_image_at_once_build_it_once(
    base_image: str, context: Path, tag: str, docker_client: docker.DockerClient
) -> None:
    """Four runs of one repository start together after its Dockerfile changed: one builds the
    image, the other three wait for it and reuse it, and the engine holds one image of that
    context (before, each built its own and three were left untagged)."""
    results: list[BuildResult] = []
    said: list[list[str]] = []
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def run() -> None:
        lines: list[str] = []
        said.append(lines)
        try:
            go.wait(10)
            results.append(build_image(docker_client, context, tag=tag, progress=lines.append))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sorted(r.built for r in results) == [False, False, False, True]
    assert len({r.image_id for r in results}) == 1
    digest = results[0].context_hash
    same = docker_client.images.list(filters={"label": f"{LABEL_HASH}={digest}"})
    assert [img.id for img in same] == [results[0].image_id]
    # The three that did not build said why: they waited for the build, and it was there.
    reused = [lines for lines in said if any("up to date" in line for line in lines)]
    assert len(reused) == 3, said
    assert any("already under way" in line for lines in reused for line in lines), said


def test_a_run_waiting_for_another_runs_build_stops_when_it_is_stopped(
    base_image: str, context: Path, tag: str, docker_client: docker.DockerClient
) -> None:
    (context / "Dockerfile").write_text("FROM trimo/base:bookworm\nCOPY hello.txt /\nRUN sleep 4\n")
    building = threading.Event()

    def first_said(line: str) -> None:
        if line.startswith("building"):
            building.set()

    first = threading.Thread(
        target=build_image,
        args=(docker_client, context),
        kwargs={"tag": tag, "progress": first_said},
    )
    first.start()
    try:
        waiting = threading.Event()
        stop = threading.Event()

        def said(line: str) -> None:
            if "already under way" in line:
                waiting.set()

        outcome: list[BaseException] = []

        def second() -> None:
            try:
                build_image(docker_client, context, tag=tag, progress=said, stop=stop)
            except ImageBuildError as exc:
                outcome.append(exc)

        deadline = time.monotonic() + 30
        waiter = threading.Thread(target=second)
        # The second asks once the first build is under way.
        assert building.wait(30), "the first build never started"
        waiter.start()
        assert waiting.wait(max(0.0, deadline - time.monotonic())), "the second run never waited"
        stopped_at = time.monotonic()
        stop.set()
        waiter.join(10)
        assert not waiter.is_alive()
        assert time.monotonic() - stopped_at < 2
        assert outcome and "was stopped" in str(outcome[0])
    finally:
        first.join(120)


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
