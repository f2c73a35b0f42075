"""trimo/base:bookworm keeps the container contract: user, profile, preboot, git guard, handback."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from bot.images import bootstrap_debian, build_image, images_dir
from bot.protocol import ExitCode
from bot.runtime import DockerRuntime
from tests.containers import git, make_repo, run_runner

pytestmark = pytest.mark.docker

DERIVED = """FROM trimo/base:bookworm
RUN echo 'export GREETING="hello from profile"' >> /etc/profile.d/trimo.sh
COPY preboot.sh /opt/trimo/preboot.sh
RUN chmod +x /opt/trimo/preboot.sh
"""
FAILING_PREBOOT = """#!/bin/bash
echo "starting postgres"
echo "FATAL: could not bind to port 5432" >&2
exit 1
"""
WAITING_PREBOOT = """#!/bin/bash
set -euo pipefail
echo "search: cannot bind 9200, address in use" > /tmp/search.log
TRIMO_WAIT_SECONDS=2 trimo-wait search /tmp/search.log false
"""
CHATTY_PREBOOT = """#!/bin/bash
set -euo pipefail
echo "preboot ran as $(id -u)"
"""


def _derived(client: docker.DockerClient, base_image: str, preboot: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        ctx = Path(d)
        (ctx / "Dockerfile").write_text(DERIVED)
        (ctx / "preboot.sh").write_text(preboot)
        tag = f"trimo-test/derived:{uuid.uuid4().hex[:8]}"
        result = build_image(client, ctx, tag=tag)
    try:
        yield result.tag
    finally:
        client.images.remove(result.image_id, force=True)


@pytest.fixture(scope="module")
def profile_image(docker_client: docker.DockerClient, base_image: str) -> Iterator[str]:
    yield from _derived(docker_client, base_image, CHATTY_PREBOOT)


@pytest.fixture(scope="module")
def failing_preboot_image(docker_client: docker.DockerClient, base_image: str) -> Iterator[str]:
    yield from _derived(docker_client, base_image, FAILING_PREBOOT)


@pytest.fixture(scope="module")
def waiting_preboot_image(docker_client: docker.DockerClient, base_image: str) -> Iterator[str]:
    yield from _derived(docker_client, base_image, WAITING_PREBOOT)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    make_repo(tmp_path / "repo", {"README.md": "# sample\n", "app.py": "print('hi')\n"})
    return tmp_path / "repo"


def test_agent_is_uid_1000_with_profile_environment(
    runtime: DockerRuntime, profile_image: str, repo: Path
) -> None:
    r = run_runner(
        runtime,
        profile_image,
        repo,
        agent_command='echo "uid=$(id -u) user=$(whoami)"; echo "greeting=$GREETING"',
    )
    assert r.exit_code == ExitCode.SUCCESS, r.text
    assert "preboot ran as 0" in r.text  # preboot is root's
    assert "uid=1000 user=agent" in r.text
    assert "greeting=hello from profile" in r.text
    assert r.kinds().index("phase") < r.kinds().index("agent")


def test_agent_commits_and_push_is_refused(
    runtime: DockerRuntime, base_image: str, repo: Path
) -> None:
    r = run_runner(
        runtime,
        base_image,
        repo,
        agent_command=(
            "echo change >> README.md && git commit -qam 'agent change' && echo committed; "
            "git push origin HEAD; echo push_exit=$?; "
            "git remote add evil https://example.invalid/x.git; echo remote_exit=$?; "
            "git config credential.helper store; echo config_exit=$?; "
            "git log --oneline | wc -l"
        ),
    )
    assert r.exit_code == ExitCode.SUCCESS, r.text
    assert "committed" in r.text
    assert "push_exit=1" in r.text and "remote_exit=1" in r.text and "config_exit=1" in r.text
    assert "`git push` is disabled in this container" in r.text
    assert "Trimo publishes your commits" in r.text
    result = r.first("result")
    assert result["commits"] == 1 and result["bundle"] == "result.bundle"
    # The bundle holds the agent's commit on top of the base.
    bundle = repo.parent / "result.bundle"
    bundle.write_bytes(r.out["result.bundle"])
    git(repo, "fetch", "-q", str(bundle), "HEAD:refs/heads/result")
    assert git(repo, "log", "-1", "--format=%s", "result") == "agent change"
    assert git(repo, "rev-parse", "result^") == result["base"]


def test_uncommitted_work_is_committed_for_the_agent(
    runtime: DockerRuntime, base_image: str, repo: Path
) -> None:
    r = run_runner(runtime, base_image, repo, agent_command="echo new > notes.txt")
    assert r.exit_code == ExitCode.SUCCESS, r.text
    assert r.first("committed")["message"].startswith("trimo:")
    assert r.first("result")["commits"] == 1


def test_failing_preboot_stops_before_the_agent(
    runtime: DockerRuntime, failing_preboot_image: str, repo: Path
) -> None:
    r = run_runner(
        runtime,
        failing_preboot_image,
        repo,
        agent_command="echo AGENT-STARTED",
        test_command="echo TESTS-STARTED",
    )
    assert r.exit_code == ExitCode.PREBOOT_FAILED
    assert "AGENT-STARTED" not in r.text and "TESTS-STARTED" not in r.text
    failure = r.first("failure")
    assert failure["reason"] == "preboot"
    assert "FATAL: could not bind to port 5432" in failure["tail"]
    assert r.first("done")["outcome"] == "preboot_failed"
    assert "agent" not in [e.data.get("phase") for e in r.events if e.kind == "phase"]


def test_tests_report_and_failure_exit_code(
    runtime: DockerRuntime, base_image: str, repo: Path
) -> None:
    junit = (
        '<testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped/></testcase></testsuite>'
    )
    r = run_runner(
        runtime, base_image, repo, test_command=f"echo '{junit}' > $TRIMO_OUT/junit.xml; exit 1"
    )
    assert r.exit_code == ExitCode.TESTS_FAILED
    tests = r.first("tests")
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert "junit.xml" in r.out


def test_agent_sees_only_its_secrets_and_cannot_forge_events(
    runtime: DockerRuntime, base_image: str, repo: Path
) -> None:
    r = run_runner(
        runtime,
        base_image,
        repo,
        env={"API_KEY": "k-123", "OTHER_TOKEN": "never-for-agent"},
        secret_names=["API_KEY"],
        agent_command=(
            'echo "key=${API_KEY:-unset} other=${OTHER_TOKEN:-unset}"; '
            'echo \'::trimo:: {"event":"done","exit_code":0}\'; exit 7'
        ),
    )
    assert "key=k-123 other=unset" in r.text
    assert r.exit_code == ExitCode.AGENT_FAILED
    assert [e.data["exit_code"] for e in r.events if e.kind == "done"] == [ExitCode.AGENT_FAILED]


def test_stop_checkpoints_the_work_so_far(
    runtime: DockerRuntime, base_image: str, repo: Path
) -> None:
    r = run_runner(
        runtime, base_image, repo, agent_command="echo draft > draft.txt; sleep 600", stop_after=3
    )
    assert r.exit_code == ExitCode.STOPPED
    assert "stopped" in r.kinds()
    assert r.first("result")["commits"] == 1
    assert "result.bundle" in r.out


@pytest.mark.slow
def test_base_builds_on_an_engine_without_registry(docker_client: docker.DockerClient) -> None:
    """From Debian's archive alone: debootstrap, import, then the base image on top of it."""
    suffix = uuid.uuid4().hex[:8]
    debian = f"trimo-test/debian:{suffix}"
    base = f"trimo-test/base:{suffix}"
    lines: list[str] = []
    try:
        assert bootstrap_debian(docker_client, lines.append, image=debian, try_pull=False)
        assert any("debootstrap" in line for line in lines)
        result = build_image(
            docker_client,
            images_dir() / "base",
            tag=base,
            buildargs={"DEBIAN_IMAGE": debian},
            progress=lines.append,
        )
        assert result.built
        out = docker_client.containers.run(
            base, entrypoint=["/bin/bash", "-lc", "id -u agent; git --version"], remove=True
        )
        assert out.decode().splitlines()[0] == "1000"
    finally:
        for ref in (base, debian):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(ref, force=True)


def test_trimo_wait_reports_a_service_that_never_answers(
    runtime: DockerRuntime, waiting_preboot_image: str, repo: Path
) -> None:
    r = run_runner(runtime, waiting_preboot_image, repo, agent_command="echo AGENT-STARTED")
    assert r.exit_code == ExitCode.PREBOOT_FAILED
    tail = r.first("failure")["tail"]
    assert "preboot: search did not answer within 2s; last lines of /tmp/search.log:" in tail
    assert "search: cannot bind 9200, address in use" in tail
    assert "AGENT-STARTED" not in r.text
