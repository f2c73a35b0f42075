"""Drive the Trimo runner in a real container: the test-side view of the container protocol."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.protocol import IN_DIR, OUT_DIR, WORKSPACE, Event, parse_line
from bot.runtime import ContainerSpec, DockerRuntime, files_tar

# Per session: sessions running side by side never clean up each other's containers.
TEST_OWNER = f"pytest-{os.getpid()}"

# The settings that decide what trimo/base:bookworm (and every image on it) is. A Trimo process or
# engine a test starts keeps them: one without the extra CA certificates builds another base and
# retags it under every other test process on the engine, whose next runs then rebuild.
IMAGE_SETTINGS = ("TRIMO_EXTRA_CA_CERTS", "TRIMO_IMAGES_DIR")


def trimo_free_env(**extra: str) -> dict[str, str]:
    """This process's environment with no Trimo setting but those that shape the images."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMO_") or k in IMAGE_SETTINGS}
    env.update(extra)
    return env


def extra_ca_certs() -> Path | None:
    """The session's extra CA certificates, as an engine built in a test must be given them."""
    extra = os.environ.get("TRIMO_EXTRA_CA_CERTS")
    return Path(extra) if extra else None


@dataclass
class RunnerResult:
    exit_code: int
    events: list[Event]
    logs: list[str]
    out: dict[str, bytes] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def first(self, kind: str) -> dict[str, Any]:
        for e in self.events:
            if e.kind == kind:
                return e.data
        raise AssertionError(f"no {kind!r} event in {self.kinds()}; logs:\n" + "\n".join(self.logs))

    @property
    def text(self) -> str:
        return "\n".join(self.logs)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_NAME": "T",
            "GIT_AUTHOR_EMAIL": "t@example.test",
            "GIT_COMMITTER_NAME": "T",
            "GIT_COMMITTER_EMAIL": "t@example.test",
            "HOME": "/nonexistent",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
        },
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None) -> str:
    """A git repository at `path` with one commit of `files`; returns the commit sha."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {"README.md": "# sample\n"}).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return git(path, "rev-parse", "HEAD")


def repo_tar(path: Path) -> bytes:
    """The repository folder as a tar owned by uid 1000, as Trimo uploads a checkout."""
    with tempfile.TemporaryFile() as f:
        subprocess.run(
            [
                "tar",
                "-C",
                str(path),
                "--owner=1000",
                "--group=1000",
                "--numeric-owner",
                "-cf",
                "-",
                ".",
            ],
            check=True,
            stdout=f,
        )
        f.seek(0)
        return f.read()


def run_runner(
    runtime: DockerRuntime,
    image: str,
    repo: Path,
    *,
    agent_command: str | None = None,
    test_command: str | None = None,
    env: dict[str, str] | None = None,
    secret_names: list[str] | None = None,
    network: str = "bridge",
    stop_after: float | None = None,
) -> RunnerResult:
    """One container of `image` on the checkout `repo`, through the real runner; always removed."""
    base = git(repo, "rev-parse", "HEAD")
    spec = ContainerSpec(
        image=image,
        run_id=0,
        pipeline_id=0,
        owner=TEST_OWNER,
        env=env or {},
        network=network,
        name=f"trimo-test-{uuid.uuid4().hex[:10]}",
    )
    run_json = {
        "run_id": 0,
        "base": base,
        "agent_command": agent_command,
        "test_command": test_command,
        "secret_names": secret_names or [],
        "heartbeat_seconds": 1,
        "git_author": {"name": "Trimo", "email": "trimo@localhost"},
    }
    cid = runtime.create(spec)
    try:
        runtime.put_archive(cid, WORKSPACE, repo_tar(repo))
        runtime.put_archive(
            cid,
            "/",
            files_tar(
                {
                    IN_DIR.lstrip("/") + "/run.json": json.dumps(run_json),
                    IN_DIR.lstrip("/") + "/task.md": "# task\n",
                }
            ),
        )
        runtime.start(cid)
        if stop_after is not None:
            import threading

            threading.Timer(stop_after, runtime.stop, args=(cid, 20)).start()
        events: list[Event] = []
        logs: list[str] = []
        for line in runtime.lines(cid):
            ev = parse_line(line)
            if ev is None:
                logs.append(line)
            else:
                events.append(ev)
        code = runtime.wait(cid)
        with tempfile.TemporaryDirectory() as d:
            out = {p.name: p.read_bytes() for p in runtime.fetch_dir(cid, OUT_DIR, Path(d))}
        return RunnerResult(code, events, logs, out)
    finally:
        runtime.remove(cid)
