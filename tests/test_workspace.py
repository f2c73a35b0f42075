"""Tests for the git workspace against real repositories: a local bare repo plays the remote."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot.errors import PublishRefused, WorkspaceError
from bot.workspace import Checkout, Remote, Workspace, path_matches

BRANCH = "trimo/12-fix-login"
TOKEN = "ghs_s3cretInstallationToken0123456789"


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [
            "git",
            "-c",
            "user.name=Tester",
            "-c",
            "user.email=tester@example.com",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            # Unpacked checkouts belong to uid 1000 (the container's agent), not to the tester.
            "-c",
            "safe.directory=*",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def commit_file(repo: Path, path: str, content: str, message: str) -> str:
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@dataclass
class Origin:
    """A bare repository playing the remote, and a clone to push to it as a person would."""

    bare: Path
    work: Path

    def head(self, branch: str) -> str | None:
        proc = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
            cwd=self.bare,
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.stdout.strip() or None


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    commit_file(work, "README.md", "hello\n", "Start")
    commit_file(work, ".trimo/config.yml", "test_command: make test\n", "Add Trimo config")
    commit_file(work, ".trimo/preboot.sh", "#!/bin/sh\necho up\n", "Add preboot")
    (work / ".trimo/preboot.sh").chmod(0o755)
    (work / "link").symlink_to("README.md")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "Make preboot executable, add a link")
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "fetch", "-q", "origin")
    return Origin(bare=bare, work=work)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "data")


def unpack(ws: Workspace, co: Checkout, dest: Path) -> list[tarfile.TarInfo]:
    with ws.checkout_tar(co) as stream:
        data = stream.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        tar.extractall(dest, filter="tar")
    return members


def agent_bundle(ws: Workspace, co: Checkout, tmp_path: Path, files: dict[str, str]) -> Path:
    """Do what the runner does: commit on the checkout, bundle base..HEAD."""
    repo = tmp_path / "container-workspace"
    unpack(ws, co, repo)
    for path, content in files.items():
        commit_file(repo, path, content, f"Change {path}")
    bundle = tmp_path / "result.bundle"
    git(repo, "bundle", "create", "-q", str(bundle), f"{co.base}..HEAD")
    return bundle


def test_first_prepare_clones_later_ones_only_fetch(ws: Workspace, origin: Origin) -> None:
    first = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert first.sync.cloned
    assert first.sync.describe() == "mirror: cloned"

    again = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert again.sync.describe() == "mirror: fetched 0 refs"

    commit_file(origin.work, "a.txt", "a\n", "More work on main")
    git(origin.work, "push", "-q", "origin", "main")
    third = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert not third.sync.cloned
    assert third.sync.describe() == "mirror: fetched 1 refs"
    assert third.default_head == origin.head("main")
    assert [p.name for p in (ws.data_dir / "mirrors").glob("*.git")] == [first.mirror.name]


def test_branch_starts_at_default_tip_then_builds_on_earlier_work(
    ws: Workspace, origin: Origin
) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert co.default_branch == "main"
    assert co.new_branch
    assert co.base == origin.head("main")

    git(origin.work, "checkout", "-q", "-b", BRANCH)
    earlier = commit_file(origin.work, "fix.py", "x = 1\n", "Earlier run's work")
    git(origin.work, "push", "-q", "origin", BRANCH)

    follow_up = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert not follow_up.new_branch
    assert follow_up.base == earlier
    assert follow_up.default_head == co.base


def test_a_fork_pr_branch_starts_at_the_pr_head_and_config_stays_on_main(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    # GitHub keeps a fork PR's commits in the base repository under refs/pull/<n>/head.
    git(origin.work, "checkout", "-q", "-b", "fork-feature")
    commit_file(origin.work, "feature.py", "x = 2\n", "The fork's change")
    commit_file(origin.work, ".trimo/config.yml", "test_command: steal-secrets\n", "PR edits")
    pr_head = git(origin.work, "rev-parse", "HEAD")
    git(origin.work, "push", "-q", "origin", "fork-feature:refs/heads/tmp-fork")
    git(origin.bare, "update-ref", "refs/pull/7/head", pr_head)
    git(origin.bare, "update-ref", "-d", "refs/heads/tmp-fork")
    branch = "trimo/pr-7-feature"

    co = ws.prepare(Remote(str(origin.bare)), branch, start_ref="refs/pull/7/head")
    assert co.new_branch
    assert co.base == pr_head
    assert co.default_head == origin.head("main") != pr_head
    # Configuration still comes from the default branch, not from the pull request.
    assert ws.read_file(co, co.default_head, ".trimo/config.yml") == b"test_command: make test\n"

    # The work of a run on it builds on the PR's head and is pushed to the pipeline branch.
    bundle = agent_bundle(ws, co, tmp_path, {"fix.py": "y = 1\n"})
    result = ws.import_bundle(co, bundle, run_id=1)
    assert [s for _, s in result.commits] == ["Change fix.py"]
    ws.publish(co, result)
    assert git(origin.bare, "rev-parse", f"{branch}~1") == pr_head

    # Once the branch exists, the next run builds on it, whatever the PR's head.
    again = ws.prepare(Remote(str(origin.bare)), branch, start_ref="refs/pull/7/head")
    assert not again.new_branch and again.base == result.head


def test_a_missing_or_invalid_start_ref_fails_clearly(ws: Workspace, origin: Origin) -> None:
    with pytest.raises(WorkspaceError, match="refs/pull/8/head does not exist"):
        ws.prepare(Remote(str(origin.bare)), "trimo/pr-8-x", start_ref="refs/pull/8/head")
    for bad in ("pull/8/head", "refs/pull/8/he..ad"):
        with pytest.raises(WorkspaceError, match="not a valid git ref to start from"):
            ws.prepare(Remote(str(origin.bare)), "trimo/pr-8-x", start_ref=bad)


def test_default_branch_is_the_remote_head(ws: Workspace, origin: Origin) -> None:
    git(origin.work, "push", "-q", "origin", "main:trunk")
    git(origin.bare, "symbolic-ref", "HEAD", "refs/heads/trunk")
    commit_file(origin.work, "b.txt", "b\n", "Only on main")
    git(origin.work, "push", "-q", "origin", "main")

    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert co.default_branch == "trunk"
    assert co.base == origin.head("trunk") != origin.head("main")


def test_checkout_tar_unpacks_to_a_clean_repo_on_the_branch(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    dest = tmp_path / "unpacked"
    members = unpack(ws, co, dest)

    assert {(m.uid, m.gid) for m in members} == {(1000, 1000)}
    assert git(dest, "symbolic-ref", "HEAD") == f"refs/heads/{BRANCH}"
    assert git(dest, "rev-parse", "HEAD") == co.base
    assert git(dest, "status", "--porcelain") == ""
    assert git(dest, "remote") == ""
    assert git(dest, "rev-list", "--count", "HEAD") == "4"
    assert (dest / "README.md").read_text() == "hello\n"
    assert os.readlink(dest / "link") == "README.md"
    assert (dest / ".trimo/preboot.sh").stat().st_mode & stat.S_IXUSR
    # Self-contained: the container cannot reach the mirror the objects came from.
    assert not (dest / ".git/objects/info/alternates").exists()
    git(dest, "fsck", "--no-dangling")
    assert not list((ws.data_dir / "tmp").iterdir())


def test_checkout_tar_can_own_its_root_directory(ws: Workspace, origin: Origin) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    with ws.checkout_tar(co, root="workspace") as stream, tarfile.open(fileobj=stream) as tar:
        members = tar.getmembers()
    assert members[0].name == "workspace"
    assert members[0].isdir()
    assert (members[0].uid, members[0].gid) == (1000, 1000)
    assert {m.name.split("/")[0] for m in members} == {"workspace"}
    assert "workspace/.git/HEAD" in {m.name for m in members}


def test_config_is_read_from_the_default_branch(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    git(origin.work, "checkout", "-q", "-b", BRANCH)
    commit_file(origin.work, ".trimo/config.yml", "test_command: steal-secrets\n", "PR edits")
    commit_file(origin.work, ".trimo/extra.sh", "evil\n", "PR adds")
    git(origin.work, "push", "-q", "origin", BRANCH)
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)

    assert ws.read_file(co, co.default_head, ".trimo/config.yml") == b"test_command: make test\n"
    assert ws.read_file(co, co.base, ".trimo/config.yml") == b"test_command: steal-secrets\n"
    assert ws.read_file(co, co.default_branch, ".trimo/missing.yml") is None
    assert ws.read_file(co, co.default_branch, ".trimo") is None

    dest = tmp_path / "context"
    written = ws.extract_dir(co, co.default_branch, ".trimo", dest)
    assert sorted(written) == [Path("config.yml"), Path("preboot.sh")]
    assert (dest / "config.yml").read_text() == "test_command: make test\n"
    assert (dest / "preboot.sh").stat().st_mode & stat.S_IXUSR
    assert ws.extract_dir(co, co.default_branch, "nothing-here", tmp_path / "empty") == []


def test_result_on_top_of_base_is_imported_and_published(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    bundle = agent_bundle(ws, co, tmp_path, {"src/login.py": "ok\n", "README.md": "fixed\n"})

    res = ws.import_bundle(co, bundle, run_id=5)
    assert [subject for _, subject in res.commits] == ["Change src/login.py", "Change README.md"]
    assert res.head == res.commits[-1][0]
    assert sorted(res.changed_paths) == ["README.md", "src/login.py"]
    ws.check_protected(res, [".github/workflows/**"])

    assert origin.head(BRANCH) is None
    ws.publish(co, res)
    assert origin.head(BRANCH) == res.head
    assert origin.head("main") == co.base

    follow_up = ws.prepare(Remote(str(origin.bare)), BRANCH)
    assert not follow_up.new_branch
    assert follow_up.base == res.head


def test_result_from_an_unrelated_root_is_refused(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    repo = tmp_path / "container-workspace"
    unpack(ws, co, repo)
    git(repo, "checkout", "-q", "--orphan", "fresh")
    git(repo, "rm", "-q", "-r", "--cached", ".")
    commit_file(repo, "new.txt", "rewritten\n", "Start over")
    bundle = tmp_path / "result.bundle"
    git(repo, "bundle", "create", "-q", str(bundle), f"{co.base}..HEAD")

    with pytest.raises(PublishRefused, match="does not descend from the run's base commit"):
        ws.import_bundle(co, bundle, run_id=6)
    assert origin.head(BRANCH) is None
    assert git(co.mirror, "for-each-ref", "refs/trimo/") == ""


def test_protected_path_change_is_refused_naming_the_path(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    bundle = agent_bundle(
        ws, co, tmp_path, {".github/workflows/ci.yml": "on: push\n", "app.py": "x\n"}
    )
    res = ws.import_bundle(co, bundle, run_id=7)

    with pytest.raises(PublishRefused) as refused:
        ws.check_protected(res, [".github/workflows/**", "secrets/"])
    assert ".github/workflows/ci.yml" in str(refused.value)
    assert "app.py" not in str(refused.value)
    assert origin.head(BRANCH) is None


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        (".github/workflows/ci.yml", ".github/workflows/**", True),
        (".github/workflows/sub/x.yml", ".github/workflows/**", True),
        (".github/dependabot.yml", ".github/workflows/**", False),
        ("deploy/.github/workflows/ci.yml", ".github/workflows/**", False),
        (".github/workflows/ci.yml", ".github/", True),
        ("pkg/.env", ".env", True),
        (".env.example", ".env", False),
        ("Dockerfile", "/Dockerfile", True),
        ("sub/Dockerfile", "/Dockerfile", False),
        ("a/b/c.pem", "**/*.pem", True),
        ("infra/prod/main.tf", "infra/*/main.tf", True),
        ("infra/prod/x/main.tf", "infra/*/main.tf", False),
    ],
)
def test_protected_patterns_follow_gitignore_rules(path: str, pattern: str, expected: bool) -> None:
    assert path_matches(path, pattern) is expected


def test_publish_never_overwrites_someone_elses_commits(
    ws: Workspace, origin: Origin, tmp_path: Path
) -> None:
    git(origin.work, "push", "-q", "origin", f"main:{BRANCH}")
    co = ws.prepare(Remote(str(origin.bare)), BRANCH)
    bundle = agent_bundle(ws, co, tmp_path, {"mine.txt": "run\n"})
    res = ws.import_bundle(co, bundle, run_id=8)

    git(origin.work, "checkout", "-q", "-b", BRANCH, f"origin/{BRANCH}")
    theirs = commit_file(origin.work, "theirs.txt", "person\n", "A person's commit")
    git(origin.work, "push", "-q", "origin", BRANCH)

    with pytest.raises(PublishRefused, match="not a fast-forward"):
        ws.publish(co, res)
    assert origin.head(BRANCH) == theirs


def test_concurrent_prepares_on_one_repository_all_succeed(tmp_path: Path, origin: Origin) -> None:
    data = tmp_path / "data"

    def run(n: int) -> Checkout:
        return Workspace(data).prepare(Remote(str(origin.bare)), f"trimo/{n}-task")

    with ThreadPoolExecutor(max_workers=5) as pool:
        checkouts = list(pool.map(run, range(5)))
    assert sum(co.sync.cloned for co in checkouts) == 1
    assert {co.base for co in checkouts} == {origin.head("main")}
    assert len(list((data / "mirrors").glob("*.git"))) == 1


def test_credentials_in_the_url_are_refused(ws: Workspace) -> None:
    with pytest.raises(WorkspaceError, match=r"Remote\(url, token=") as refused:
        ws.prepare(Remote(f"https://x-access-token:{TOKEN}@github.com/o/r.git"), BRANCH)
    assert TOKEN not in str(refused.value)
    assert TOKEN not in repr(Remote("https://github.com/o/r.git", TOKEN))


# -- the token over real HTTP ------------------------------------------------------------------


@dataclass
class GitServer:
    url: str
    authorizations: list[str | None] = field(default_factory=list)


def _backend() -> str:
    exec_path = subprocess.run(
        ["git", "--exec-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return str(Path(exec_path) / "git-http-backend")


@pytest.fixture
def git_server(origin: Origin) -> Iterator[GitServer]:
    """Smart HTTP through `git http-backend`, answering 401 unless the expected token is sent."""
    expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    backend = _backend()
    state = GitServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.serve()

        def do_POST(self) -> None:
            self.serve()

        def serve(self) -> None:
            auth = self.headers.get("Authorization")
            state.authorizations.append(auth)
            if auth != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="trimo-test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.read_body()
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(origin.bare.parent),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REMOTE_USER": "x-access-token",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            }
            out = subprocess.run(
                [backend], input=body, env=env, capture_output=True, check=True
            ).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if line]
            status = next((int(v.split()[0]) for k, v in headers if k == "Status"), 200)
            self.send_response(status)
            for key, value in headers:
                if key != "Status":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding") != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        state.url = f"http://127.0.0.1:{server.server_port}/{origin.bare.name}"
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_token_is_sent_as_a_header_and_never_stored(
    ws: Workspace, origin: Origin, git_server: GitServer, tmp_path: Path
) -> None:
    remote = Remote(git_server.url, TOKEN)
    co = ws.prepare(remote, BRANCH)
    assert co.default_branch == "main"
    assert co.base == origin.head("main")
    assert git_server.authorizations
    assert all(a is not None and a.startswith("Basic ") for a in git_server.authorizations)

    bundle = agent_bundle(ws, co, tmp_path, {"fix.txt": "done\n"})
    res = ws.import_bundle(co, bundle, run_id=9)
    ws.publish(co, res)
    assert origin.head(BRANCH) == res.head

    with ws.checkout_tar(co) as stream:
        tar_bytes = stream.read()
    encoded = base64.b64encode(f"x-access-token:{TOKEN}".encode())
    stored = [p for p in (ws.data_dir).rglob("*") if p.is_file()]
    for blob in [tar_bytes, *(p.read_bytes() for p in stored)]:
        assert TOKEN.encode() not in blob
        assert encoded not in blob
    assert git(co.mirror, "config", "remote.origin.url") == git_server.url


def test_a_rejected_token_fails_clearly_without_showing_it(
    ws: Workspace, git_server: GitServer
) -> None:
    with pytest.raises(WorkspaceError, match="git fetch") as failed:
        ws.prepare(Remote(git_server.url, TOKEN + "-expired"), BRANCH)
    assert TOKEN not in str(failed.value)
    assert git_server.authorizations
    assert not list((ws.data_dir / "mirrors").glob("*.git"))
