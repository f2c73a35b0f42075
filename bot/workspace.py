"""The git workspace: mirror cache, pipeline branch, checkout tar, bundle import and publish.

One bare mirror per repository lives under ``<data_dir>/mirrors/``; every run of every pipeline on
that repository shares it. The daemon alone talks to the remote: the container gets a tar of a
plain checkout with no remote and no credentials, and hands its commits back as a git bundle.

    ws = Workspace(data_dir)
    co = ws.prepare(Remote(url, token), branch="trimo/12-fix-login")   # -> Checkout
    co = ws.prepare(remote, "trimo/pr-7-x", start_ref="refs/pull/7/head")  # a fork PR's head
    log(co.sync.describe())                       # "mirror: cloned" / "mirror: fetched 3 refs"
    with ws.checkout_tar(co) as tar:              # uid/gid 1000 tar for put_archive("/workspace")
        container.put_archive("/workspace", tar)
    cfg = ws.read_file(co, co.default_head, ".trimo/config.yml")       # bytes | None
    ws.extract_dir(co, co.default_head, ".trimo", dest)                # -> list[Path]
    res = ws.import_bundle(co, bundle_path, run_id=5)                  # -> Result
    ws.check_protected(res, [".github/workflows/**"])
    ws.publish(co, res, Remote(url, fresh_token), branch="feature")  # fast-forward push
    ws.format_patch(co, res)                      # `git am`-able text when nothing is pushed

Results leave the mirror only through `publish` (every push, to the base repository or a fork)
and `format_patch` (every patch).

Tokens reach git only through ``GIT_CONFIG_*`` environment variables (an ``http.extraHeader``),
never a URL, a config file or a log line; any git error text is masked before it is raised.
Reading the mirror (commits, files, ancestry, the commits a run added) goes through GitPython;
whatever talks to the remote, writes refs or streams many objects runs the git CLI (README.md,
"Dependencies", says why).
Each mirror has a lock file: writers (fetch, bundle import, publish) hold it exclusively, readers
(checkout, file reads) shared, so concurrent runs on one repository never see a half-written mirror.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, NoReturn
from urllib.parse import urlsplit

import git as gitpython

from bot.errors import PublishRefused, WorkspaceError
from bot.paths import is_protected

AGENT_UID = 1000
AGENT_GID = 1000
NETWORK_TIMEOUT_SECONDS = 900
LOCAL_TIMEOUT_SECONDS = 300

SYNC_CLONED = "mirror: cloned"
SYNC_FETCHED = "mirror: fetched {count} refs"
GIT_FAILED = "git {command} failed (exit {code}): {stderr}"
GIT_TIMED_OUT = "git {command} did not finish within {seconds} s"
URL_HAS_CREDENTIALS = (
    "the remote URL {url} carries credentials; pass the token as Remote(url, token=...) "
    "so it never lands in the mirror's config"
)
NO_DEFAULT_BRANCH = (
    "the remote {url} has no default branch (HEAD); is the repository empty? "
    "Push a first commit or pass default_branch"
)
DEFAULT_BRANCH_MISSING = "the default branch {branch!r} does not exist on {url}"
BAD_START_REF = "{ref!r} is not a valid git ref to start from (expected e.g. refs/pull/7/head)"
START_REF_MISSING = "{ref} does not exist on {url} (was the pull request's head branch deleted?)"
BAD_BRANCH_NAME = "{branch!r} is not a valid git branch name"
BUNDLE_NO_HEAD = (
    "the bundle {path} holds no usable head (refs: {refs}); the runner's handback failed"
)
NOT_DESCENDANT = (
    "the result of run {run_id} ({head}) does not descend from the run's base commit {base} "
    "(the history was rewritten or reset to an unrelated root); nothing was pushed"
)
PROTECTED_PATHS = (
    "the result of run {run_id} changes protected path(s): {paths}; nothing was pushed. "
    "Change these files by hand or remove them from the protected list"
)
NOT_FAST_FORWARD = (
    "branch {branch!r} on {url} moved since the run started (expected {base}); the result "
    "{head} is not a fast-forward and was not pushed, so nobody's commits were overwritten. "
    "Retry the run to build on the new tip"
)
PUSH_DENIED = "{url} refused the push to {branch!r}: {detail}"
UNSAFE_SYMLINK = "{path} in {ref} is a symlink to {target!r}, outside {subdir}; refusing to extract"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_UNAUTHORIZED = ("error: 401", "Authentication failed", "could not read Username")
_FORBIDDEN = ("error: 403", "Permission to", "denied to", "[remote rejected]")


class PushDenied(WorkspaceError):
    """The remote refused the push itself (credentials, permission, a hook), not its content.

    `unauthorized`: the credentials were refused (HTTP 401), so a new token may succeed.
    """

    def __init__(self, message: str, *, unauthorized: bool) -> None:
        self.unauthorized = unauthorized
        super().__init__(message)


@dataclass(frozen=True)
class Remote:
    """Where a repository lives; `token` (if any) is sent as an HTTP header, never stored."""

    url: str
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MirrorSync:
    """What bringing the mirror up to date did."""

    cloned: bool
    refs_updated: int

    def describe(self) -> str:
        if self.cloned:
            return SYNC_CLONED
        return SYNC_FETCHED.format(count=self.refs_updated)


@dataclass(frozen=True)
class Checkout:
    """A run's starting point: the pipeline branch at `base`, in the repository's mirror."""

    remote: Remote
    mirror: Path
    branch: str
    base: str
    new_branch: bool
    default_branch: str
    default_head: str
    sync: MirrorSync


@dataclass(frozen=True)
class Result:
    """Commits a run handed back, imported into the mirror and checked to descend from base."""

    run_id: int
    base: str
    head: str
    ref: str
    commits: list[tuple[str, str]]
    changed_paths: list[str]


class Workspace:
    """Git operations for runs, rooted at one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.mirrors_dir = self.data_dir / "mirrors"
        # Staging lives next to the mirrors so `clone --local` can hardlink the packs.
        self.tmp_dir = self.data_dir / "tmp"

    # -- mirror and pipeline branch ------------------------------------------------------------

    def mirror_path(self, remote: Remote) -> Path:
        """The mirror directory for `remote`: ``<sanitized owner-repo>-<hash8>.git``."""
        url = remote.url.rstrip("/")
        digest = hashlib.sha256(url.encode()).hexdigest()[:8]
        parts = [p for p in re.split(r"[/:\\]", url) if p][-2:]
        name = _SAFE_NAME.sub("-", "-".join(parts)).removesuffix(".git").strip(".-") or "repo"
        return self.mirrors_dir / f"{name[:60]}-{digest}.git"

    def prepare(
        self,
        remote: Remote,
        branch: str,
        default_branch: str | None = None,
        start_ref: str | None = None,
        *,
        follow_branch: bool = True,
    ) -> Checkout:
        """Bring the mirror up to date and find the base of `branch`.

        With ``follow_branch=False`` (a fork's run) the base is `start_ref` whatever the
        remote's `branch` holds.

        When the branch exists on the remote the run builds on its tip; otherwise it starts from
        `start_ref` (a ref of the remote such as a fork pull request's ``refs/pull/7/head``,
        fetched into the mirror) or, without one, from the default branch's tip; the branch is
        created on the remote by `publish`. The default branch's head is found either way:
        configuration and image come from there.
        """
        _refuse_credentials_in_url(remote)
        git = _Git(remote)
        git.run(
            ["check-ref-format", f"refs/heads/{branch}"],
            error=BAD_BRANCH_NAME.format(branch=branch),
        )
        if start_ref is not None:
            if not start_ref.startswith("refs/"):
                raise WorkspaceError(BAD_START_REF.format(ref=start_ref))
            git.run(["check-ref-format", start_ref], error=BAD_START_REF.format(ref=start_ref))
        mirror = self.mirror_path(remote)
        with self._lock(mirror, exclusive=True):
            sync = self._sync_mirror(git, mirror)
            if default_branch is None:
                default_branch = self._remote_default_branch(git)
            default_head = _commit(mirror, f"refs/heads/{default_branch}")
            if default_head is None:
                raise WorkspaceError(
                    DEFAULT_BRANCH_MISSING.format(branch=default_branch, url=remote.url)
                )
            git.run(["symbolic-ref", "HEAD", f"refs/heads/{default_branch}"], cwd=mirror)
            branch_head = _commit(mirror, f"refs/heads/{branch}") if follow_branch else None
            start = default_head
            if branch_head is None and start_ref is not None:
                start = self._fetch_start(git, mirror, start_ref)
        return Checkout(
            remote=remote,
            mirror=mirror,
            branch=branch,
            base=branch_head or start,
            new_branch=branch_head is None,
            default_branch=default_branch,
            default_head=default_head,
            sync=sync,
        )

    def _sync_mirror(self, git: _Git, mirror: Path) -> MirrorSync:
        if mirror.exists():
            before = git.refs(mirror)
            git.run(["fetch", "--prune", "--quiet", "origin"], cwd=mirror, network=True)
            after = git.refs(mirror)
            changed = {r for r in before.keys() | after.keys() if before.get(r) != after.get(r)}
            return MirrorSync(cloned=False, refs_updated=len(changed))
        self.mirrors_dir.mkdir(parents=True, exist_ok=True)
        # Clone into a scratch name and rename, so a crash never leaves a half mirror behind.
        staging = Path(tempfile.mkdtemp(dir=self.mirrors_dir, prefix=".cloning-"))
        try:
            git.run(["init", "--quiet", "--bare", str(staging)])
            for key, value in (
                ("remote.origin.url", git.remote.url),
                ("remote.origin.fetch", "+refs/heads/*:refs/heads/*"),
                # Fetch runs under the mirror lock; a detached gc would outlive it.
                ("gc.autoDetach", "false"),
            ):
                git.run(["config", key, value], cwd=staging)
            git.run(
                ["config", "--add", "remote.origin.fetch", "+refs/tags/*:refs/tags/*"], cwd=staging
            )
            git.run(["fetch", "--prune", "--quiet", "origin"], cwd=staging, network=True)
            staging.rename(mirror)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return MirrorSync(cloned=True, refs_updated=len(git.refs(mirror)))

    def _fetch_start(self, git: _Git, mirror: Path, start_ref: str) -> str:
        """Fetch `start_ref` of the remote into the mirror (under refs/trimo/); its commit."""
        local = "refs/trimo/start/" + start_ref.removeprefix("refs/")
        git.run(
            ["fetch", "--quiet", "--no-tags", "origin", f"+{start_ref}:{local}"],
            cwd=mirror,
            network=True,
            check=False,
        )
        if git.last_code != 0:
            if "couldn't find remote ref" in git.last_stderr:
                raise WorkspaceError(START_REF_MISSING.format(ref=start_ref, url=git.remote.url))
            git.fail(["fetch", start_ref])
        head = _commit(mirror, local)
        assert head is not None  # the fetch above just wrote it
        return head

    def _remote_default_branch(self, git: _Git) -> str:
        out = git.run(["ls-remote", "--symref", git.remote.url, "HEAD"], network=True)
        for line in out.decode().splitlines():
            if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
                return line.removeprefix("ref: refs/heads/").removesuffix("\tHEAD")
        raise WorkspaceError(NO_DEFAULT_BRANCH.format(url=git.remote.url))

    # -- what goes into the container ----------------------------------------------------------

    @contextlib.contextmanager
    def checkout_tar(self, checkout: Checkout, root: str | None = None) -> Iterator[IO[bytes]]:
        """Yield a rewound tar of a checkout of the branch at base, for ``put_archive``.

        The tar holds the working tree and a self-contained `.git` whose HEAD is the pipeline
        branch, with no remote; every entry belongs to uid/gid 1000. Docker leaves the ownership
        of the target directory itself alone, so with ``root="workspace"`` the entries sit under
        a ``workspace/`` entry of their own, for ``put_archive("/", tar)``: then ``/workspace``
        is the agent's too, whatever the image made it.
        """
        git = _Git(checkout.remote)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="checkout-"))
        try:
            work = stage / "w"
            with self._lock(checkout.mirror, exclusive=False):
                git.run(
                    [
                        "clone",
                        "--quiet",
                        "--local",
                        "--no-checkout",
                        str(checkout.mirror),
                        str(work),
                    ]
                )
            git.run(["checkout", "--quiet", "-B", checkout.branch, checkout.base], cwd=work)
            git.run(["remote", "remove", "origin"], cwd=work)
            with tempfile.TemporaryFile(dir=self.tmp_dir) as out:
                _write_tar(work, out, root)
                out.seek(0)
                shutil.rmtree(stage, ignore_errors=True)
                yield out
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def read_file(self, checkout: Checkout, ref: str, path: str) -> bytes | None:
        """The content of `path` at `ref` in the mirror, or None when it is not a file there."""
        with (
            self._lock(checkout.mirror, exclusive=False),
            gitpython.Repo(checkout.mirror) as repo,
        ):
            try:
                entry = repo.commit(ref).tree / path.strip("/")
            except (KeyError, gitpython.BadName, gitpython.BadObject, ValueError):
                return None
            if not isinstance(entry, gitpython.Blob):
                return None
            return bytes(entry.data_stream.read())

    def extract_dir(self, checkout: Checkout, ref: str, subdir: str, dest: Path) -> list[Path]:
        """Write the files under `subdir` at `ref` into `dest`; return their paths inside dest.

        Files are written byte for byte (no attributes or filters applied); a missing subdir
        yields an empty list.
        """
        git = _Git(checkout.remote)
        subdir = subdir.strip("/")
        with self._lock(checkout.mirror, exclusive=False):
            listing = git.run(
                ["ls-tree", "-r", "-z", "--full-tree", ref, "--", subdir], cwd=checkout.mirror
            )
            entries = [_parse_ls_tree(e) for e in listing.split(b"\0") if e]
            # A file named like the directory is not a directory's content.
            entries = [e for e in entries if e[2] != subdir]
            blobs = _read_blobs(
                git, checkout.mirror, [sha for mode, sha, _ in entries if mode != "160000"]
            )
        written: list[Path] = []
        for mode, sha, path in entries:
            rel = PurePosixPath(path).relative_to(subdir)
            target = Path(dest, *rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "160000":
                continue  # a submodule: no content in this repository
            if mode == "120000":
                link = blobs[sha].decode()
                resolved = os.path.normpath(PurePosixPath("/", subdir, rel.parent, link))
                if PurePosixPath(link).is_absolute() or not resolved.startswith(f"/{subdir}/"):
                    raise WorkspaceError(
                        UNSAFE_SYMLINK.format(path=path, ref=ref, target=link, subdir=subdir)
                    )
                target.symlink_to(link)
            else:
                target.write_bytes(blobs[sha])
                target.chmod(0o755 if mode == "100755" else 0o644)
            written.append(Path(*rel.parts))
        return written

    # -- what comes back -----------------------------------------------------------------------

    def import_bundle(self, checkout: Checkout, bundle_path: Path, run_id: int) -> Result:
        """Fetch a run's bundle into ``refs/trimo/results/<run_id>`` and verify it.

        Raises PublishRefused when the head does not descend from the run's base commit.
        """
        git = _Git(checkout.remote)
        mirror = checkout.mirror
        ref = f"refs/trimo/results/{run_id}"
        with self._lock(mirror, exclusive=True):
            heads = git.run(["bundle", "list-heads", str(bundle_path)], cwd=mirror).decode()
            names = [line.split(maxsplit=1)[1] for line in heads.splitlines() if " " in line]
            source = "HEAD" if "HEAD" in names else (names[0] if len(names) == 1 else None)
            if source is None:
                raise WorkspaceError(
                    BUNDLE_NO_HEAD.format(path=bundle_path, refs=", ".join(names) or "none")
                )
            git.run(
                ["fetch", "--quiet", "--no-tags", str(bundle_path), f"+{source}:{ref}"], cwd=mirror
            )
            head = _commit(mirror, ref)
            assert head is not None  # the fetch above just wrote it
            with gitpython.Repo(mirror) as repo:
                try:
                    descends = repo.is_ancestor(checkout.base, head)  # type: ignore[arg-type]
                except gitpython.GitCommandError as exc:
                    raise WorkspaceError(
                        GIT_FAILED.format(
                            command="merge-base --is-ancestor",
                            code=exc.status,
                            stderr=str(exc.stderr).strip(),
                        )
                    ) from None
                if not descends:
                    git.run(["update-ref", "-d", ref], cwd=mirror)
                    raise PublishRefused(
                        NOT_DESCENDANT.format(run_id=run_id, head=head, base=checkout.base)
                    )
                commits = [
                    (c.hexsha, _subject(c.message))
                    for c in repo.iter_commits(f"{checkout.base}..{head}", reverse=True)
                ]
            # The CLI: GitPython's diff always detects renames, and a rename must list both paths.
            diff = git.run(
                ["diff", "--name-only", "-z", "--no-renames", checkout.base, head], cwd=mirror
            )
        paths = [p for p in diff.decode(errors="surrogateescape").split("\0") if p]
        return Result(
            run_id=run_id,
            base=checkout.base,
            head=head,
            ref=ref,
            commits=commits,
            changed_paths=paths,
        )

    def check_protected(self, result: Result, patterns: Sequence[str]) -> None:
        """Raise PublishRefused naming every changed path matched by a gitignore-style pattern."""
        hits = [p for p in result.changed_paths if is_protected(p, patterns)]
        if hits:
            raise PublishRefused(
                PROTECTED_PATHS.format(run_id=result.run_id, paths=", ".join(hits))
            )

    def publish(
        self,
        checkout: Checkout,
        result: Result,
        remote: Remote | None = None,
        *,
        branch: str | None = None,
    ) -> None:
        """Push the result's head to `branch` (default: the pipeline branch), fast-forward only.

        `remote` defaults to the checkout's; pass one for a fresh token or another repository (a
        fork's head branch). A branch that moved since base raises PublishRefused and the remote
        keeps its commits; a remote refusing the push itself raises PushDenied.
        """
        remote = remote or checkout.remote
        _refuse_credentials_in_url(remote)
        git = _Git(remote)
        mirror = checkout.mirror
        branch = branch or checkout.branch
        target = f"refs/heads/{branch}"
        same_remote = remote.url == checkout.remote.url
        with self._lock(mirror, exclusive=True):
            # A plain push (no force) is refused by the remote unless it is a fast-forward.
            report = git.run(
                ["push", "--porcelain", remote.url, f"{result.head}:{target}"],
                cwd=mirror,
                network=True,
                check=False,
            ).decode(errors="replace")
            if git.last_code != 0:
                # Porcelain marks a refused ref with "!"; "[rejected]" is git's non-fast-forward.
                refused = [line for line in report.splitlines() if line.startswith("!")]
                if any("\t[rejected]" in line for line in refused):
                    raise PublishRefused(
                        NOT_FAST_FORWARD.format(
                            branch=branch,
                            url=remote.url,
                            base=checkout.base,
                            head=result.head,
                        )
                    )
                detail = "; ".join([*refused, git.last_stderr])
                unauthorized = any(mark in detail for mark in _UNAUTHORIZED)
                if unauthorized or any(mark in detail for mark in _FORBIDDEN):
                    raise PushDenied(
                        git.mask(PUSH_DENIED.format(url=remote.url, branch=branch, detail=detail)),
                        unauthorized=unauthorized,
                    )
                git.last_stderr = detail
                git.fail(["push"])
            if same_remote:
                git.run(["update-ref", target, result.head], cwd=mirror)
            git.run(["update-ref", "-d", result.ref], cwd=mirror)

    def format_patch(self, checkout: Checkout, result: Result) -> str:
        """The result's commits as one `git am`-able mbox (``git format-patch base..head``)."""
        git = _Git(checkout.remote)
        with self._lock(checkout.mirror, exclusive=False):
            out = git.run(
                ["format-patch", "--stdout", "--no-signature", f"{result.base}..{result.head}"],
                cwd=checkout.mirror,
            )
        return out.decode(errors="replace")

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, mirror: Path, *, exclusive: bool) -> Iterator[None]:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        with open(mirror.with_name(mirror.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def path_matches(path: str, pattern: str) -> bool:
    """Whether `path` (or a directory above it) matches a gitignore-style `pattern`."""
    return is_protected(path, [pattern])


class _Git:
    """Runs git with the remote's token in the environment and masks it out of any error."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.last_code = 0
        self.last_stderr = ""
        # LFS content would need the network from inside a checkout; pointers are enough.
        self.env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_LFS_SKIP_SMUDGE": "1",
            "LC_ALL": "C",
        }
        self._secrets: list[str] = []
        if remote.token:
            basic = base64.b64encode(f"x-access-token:{remote.token}".encode()).decode()
            self._secrets = [remote.token, basic]
            config = [
                ("http.extraHeader", f"Authorization: Basic {basic}"),
                # No helper may store or offer credentials for this remote.
                ("credential.helper", ""),
            ]
            self.env["GIT_CONFIG_COUNT"] = str(len(config))
            for n, (key, value) in enumerate(config):
                self.env[f"GIT_CONFIG_KEY_{n}"] = key
                self.env[f"GIT_CONFIG_VALUE_{n}"] = value

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def run(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        network: bool = False,
        check: bool = True,
        error: str | None = None,
    ) -> bytes:
        timeout = NETWORK_TIMEOUT_SECONDS if network else LOCAL_TIMEOUT_SECONDS
        try:
            proc = subprocess.run(
                ["git", *args],
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WorkspaceError(
                self.mask(GIT_TIMED_OUT.format(command=args[0], seconds=timeout))
            ) from None
        self.last_code = proc.returncode
        self.last_stderr = self.mask(proc.stderr.decode(errors="replace")).strip()
        if check and proc.returncode != 0:
            if error is not None:
                raise WorkspaceError(error)
            self.fail(args)
        return proc.stdout

    def fail(self, args: list[str]) -> NoReturn:
        raise WorkspaceError(
            self.mask(
                GIT_FAILED.format(
                    command=" ".join(args[:2]), code=self.last_code, stderr=self.last_stderr
                )
            )
        )

    def refs(self, repo: Path) -> dict[str, str]:
        # The CLI: one for-each-ref lists every ref with its object; GitPython asks its object
        # database once per ref, which for a mirror with thousands of tags is thousands of calls.
        out = self.run(["for-each-ref", "--format=%(objectname) %(refname)"], cwd=repo)
        pairs = (line.split(" ", 1) for line in out.decode().splitlines())
        return {name: sha for sha, name in pairs if not name.startswith("refs/trimo/")}


def _commit(repo: Path, ref: str) -> str | None:
    """The commit `ref` names in `repo`, or None when it names none."""
    with gitpython.Repo(repo) as r:
        try:
            return r.commit(ref).hexsha
        except (gitpython.BadName, gitpython.BadObject, ValueError):
            return None


def _subject(message: str | bytes) -> str:
    """A commit's subject as `git log --format=%s` shows it: its first paragraph on one line."""
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    return " ".join(text.strip().split("\n\n", 1)[0].split("\n")).strip()


def _refuse_credentials_in_url(remote: Remote) -> None:
    parts = urlsplit(remote.url)
    if parts.scheme and "@" in parts.netloc and (parts.password or parts.scheme.startswith("http")):
        shown = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
        raise WorkspaceError(URL_HAS_CREDENTIALS.format(url=shown))


def _parse_ls_tree(entry: bytes) -> tuple[str, str, str]:
    meta, _, path = entry.partition(b"\t")
    mode, _, sha = meta.decode().split(" ")
    return mode, sha, path.decode(errors="surrogateescape")


def _read_blobs(git: _Git, repo: Path, shas: list[str]) -> dict[str, bytes]:
    if not shas:
        return {}
    proc = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=repo,
        env=git.env,
        input="".join(f"{s}\n" for s in shas).encode(),
        capture_output=True,
        timeout=LOCAL_TIMEOUT_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        raise WorkspaceError(git.mask(proc.stderr.decode(errors="replace")))
    blobs: dict[str, bytes] = {}
    out, pos = proc.stdout, 0
    for _ in shas:
        header_end = out.index(b"\n", pos)
        sha, _, size = out[pos:header_end].decode().split(" ")
        start = header_end + 1
        blobs[sha] = out[start : start + int(size)]
        pos = start + int(size) + 1
    return blobs


def _write_tar(work: Path, out: IO[bytes], root: str | None) -> None:
    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid, info.gid = AGENT_UID, AGENT_GID
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if root:
            tar.add(work, arcname=root, recursive=False, filter=owned)
        prefix = f"{root}/" if root else ""
        for entry in sorted(os.listdir(work)):
            tar.add(work / entry, arcname=prefix + entry, recursive=True, filter=owned)
