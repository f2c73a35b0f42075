"""Images: the Debian bootstrap, content-hash tags, and builds skipped when nothing changed.

An image's identity is the hash of its build context (every file's path, mode and bytes) plus the
ids of the images it builds FROM, so a change to the base image rebuilds what sits on it. The hash
is stored as the label `trimo.context-hash`; a build whose hash an image already carries is not a
build at all: the engine is asked nothing but a lookup.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from bot.cacerts import read_certificates
from bot.errors import ImageBuildError, TrimoError

log = logging.getLogger(__name__)

LABEL_HASH = "trimo.context-hash"
LABEL_CONTEXT = "trimo.context-name"
HASH_REPO = "trimo-ctx"
BASE_IMAGE = "trimo/base:bookworm"
DEBIAN_IMAGE = "debian:bookworm"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TAIL_LINES = 30
# In images/base: update-ca-certificates adds the .crt files found here to the system bundle.
EXTRA_CA_DIR = "extra-ca"
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", re.IGNORECASE | re.MULTILINE)
_ARG_DEFAULT = re.compile(r"^\s*ARG\s+(\w+)=(\S+)", re.IGNORECASE | re.MULTILINE)

Progress = Callable[[str], None]

BUILD_TIMED_OUT = (
    "building {tag} took longer than {seconds}s and was stopped: make the build faster, or "
    "raise image.build_timeout in .trimo/config.yml (the server's image_build_timeout caps it)"
)

BUILD_STOPPED = "building {tag} was stopped: its run is being stopped"

BOOTSTRAP_WHY = (
    "No registry answered for {image}, so Trimo makes it here from Debian's archive "
    "(debootstrap {suite}, then docker import). This happens once per engine."
)


@dataclass(frozen=True)
class BuildResult:
    tag: str
    image_id: str
    context_hash: str
    built: bool  # False: an image with this context hash existed, nothing was built
    seconds: float


def images_dir() -> Path:
    """Where Trimo's own images live: `TRIMO_IMAGES_DIR`, else `images/` beside the package."""
    env = os.environ.get("TRIMO_IMAGES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "images"


def _from_images(dockerfile: Path, buildargs: dict[str, str]) -> list[str]:
    text = dockerfile.read_text(encoding="utf-8", errors="replace")
    args = {**dict(_ARG_DEFAULT.findall(text)), **buildargs}
    names = []
    for raw in _FROM.findall(text):
        names.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), raw))
    return names


def context_hash(
    context: Path,
    dockerfile: str = "Dockerfile",
    client: docker.DockerClient | None = None,
    buildargs: dict[str, str] | None = None,
) -> str:
    """sha256 of the build context and the ids of the images it builds FROM."""
    h = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(context).as_posix()
        h.update(rel.encode() + b"\0")
        if path.is_symlink():
            h.update(b"link:" + os.readlink(path).encode() + b"\0")
            continue
        h.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(b"dockerfile:" + dockerfile.encode() + b"\0")
    for key, value in sorted((buildargs or {}).items()):
        h.update(f"arg:{key}={value}".encode() + b"\0")
    if client is not None:
        for ref in _from_images(context / dockerfile, buildargs or {}):
            try:
                h.update(b"from:" + str(client.images.get(ref).id).encode() + b"\0")
            except docker.errors.ImageNotFound:
                h.update(b"from:" + ref.encode() + b"\0")
    return h.hexdigest()


def hash_tag(digest: str) -> str:
    """The tag that marks the image built from exactly this context.

    Labels are inherited by every image built FROM this one, so a label alone cannot say which
    image a context produced; a tag is never inherited.
    """
    return f"{HASH_REPO}:{digest}"


def find_by_hash(client: docker.DockerClient, digest: str) -> str | None:
    """The id of the local image built from this context hash, if any."""
    try:
        return str(client.images.get(hash_tag(digest)).id)
    except docker.errors.ImageNotFound:
        return None


def default_tag(context: Path, digest: str, name: str | None = None) -> str:
    if name is None:
        name = context.resolve().name
        if name == ".trimo":
            name = context.resolve().parent.name
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "project"
    return f"trimo/{name}:ctx-{digest[:12]}"


# The build a thread is waiting on, so the response hook below can hand its deadline the
# connection to cut. One per thread: the engine builds for several runs at once on one client.
_building = threading.local()


def _remember_build(response: requests.Response, *args: object, **kwargs: object) -> None:
    deadline = getattr(_building, "deadline", None)
    if deadline is not None and response.request.path_url.split("?")[0].endswith("/build"):
        deadline.response = response


class _BuildDeadline:
    """Cuts a build's connection when its time is up; the engine then cancels the build (and
    kills the step's container), as it does for any client that goes away."""

    def __init__(self, seconds: float | None, stop: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.stop = stop or threading.Event()
        self.response: requests.Response | None = None
        # Set when the build is cut: at its deadline, or because `stop` was set.
        self.expired = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="image-build-deadline", daemon=True
        )

    def __enter__(self) -> _BuildDeadline:
        _building.deadline = self
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _building.deadline = None
        self.done.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        until = None if self.seconds is None else time.monotonic() + self.seconds
        while not self.done.wait(0.2):
            if self.stop.is_set() or (until is not None and time.monotonic() >= until):
                break
        else:
            return
        self.expired.set()
        # The context may still be on its way up: the answer (and its socket) comes after.
        while not self.done.is_set():
            if self.response is not None:
                _cut(self.response)
                return
            self.done.wait(0.2)


def _cut(response: requests.Response) -> None:
    # The connection's socket (or the SocketIO around it): docker-py reads attach streams so too.
    raw: Any = response.raw._fp.fp.raw  # type: ignore[union-attr]
    sock: Any = getattr(raw, "_sock", raw)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        response.close()


def build_image(
    client: docker.DockerClient,
    context: Path,
    tag: str | None = None,
    dockerfile: str = "Dockerfile",
    progress: Progress | None = None,
    nocache: bool = False,
    buildargs: dict[str, str] | None = None,
    name: str | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> BuildResult:
    """Build `context` unless an image with its content hash exists; tag the result `tag`.

    Without `tag`, the tag is `trimo/<name>:ctx-<hash>` (`name` defaults to the folder's). A
    build still going after `timeout` seconds, or when `stop` is set, is stopped and raises
    ImageBuildError.
    """
    say = progress or (lambda _line: None)
    started = time.monotonic()
    if not (context / dockerfile).is_file():
        raise ImageBuildError(f"no {dockerfile} in {context}", [])
    digest = context_hash(context, dockerfile, client, buildargs)
    tag = tag or default_tag(context, digest, name)
    # Runs of one repository that start together (five slots, one new Dockerfile) build its
    # image once: the others wait and reuse it, rather than each building the same image and
    # leaving all but the last untagged on the engine.
    with _one_build(client, digest, tag, say, started, timeout, stop):
        existing = None if nocache else find_by_hash(client, digest)
        if existing:
            repo, _, version = tag.rpartition(":")
            client.api.tag(existing, repo, version)
            say(f"image {tag} is up to date (context {digest[:12]}): nothing to build")
            return BuildResult(tag, existing, digest, False, time.monotonic() - started)
        say(f"building {tag} from {context} (context {digest[:12]})")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        image_id = None
        hooks = client.api.hooks.setdefault("response", [])
        if _remember_build not in hooks:
            hooks.append(_remember_build)
        # `timeout` counts from the call: waiting for another build of it is part of it.
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        with _BuildDeadline(left, stop) as deadline:
            try:
                lines = _build_lines(client, context, tag, dockerfile, digest, nocache, buildargs)
                for line in lines:
                    tail.append(line)
                    if line.startswith("Step ") or line.startswith("Successfully"):
                        say(f"[{time.monotonic() - started:5.1f}s] {line}")
                    m = re.match(r"Successfully built ([0-9a-f]+)", line)
                    if m:
                        image_id = m.group(1)
                    if line.startswith("ERROR: ") and not deadline.expired.is_set():
                        raise ImageBuildError(f"building {tag} failed: {line[7:]}", list(tail))
            except ImageBuildError:
                raise
            except Exception:
                if not deadline.expired.is_set():
                    raise
            if deadline.expired.is_set():
                if deadline.stop.is_set():
                    raise ImageBuildError(BUILD_STOPPED.format(tag=tag), list(tail))
                raise ImageBuildError(
                    BUILD_TIMED_OUT.format(tag=tag, seconds=f"{timeout:g}"), list(tail)
                )
        if image_id is None:
            raise ImageBuildError(f"building {tag} failed", list(tail))
        full_id = str(client.images.get(tag).id)
        client.api.tag(full_id, HASH_REPO, digest)
        say(f"built {tag} in {time.monotonic() - started:.1f}s")
        return BuildResult(tag, full_id, digest, True, time.monotonic() - started)


_builds: dict[tuple[str, str], threading.Lock] = {}
_builds_lock = threading.Lock()


@contextmanager
def _one_build(
    client: docker.DockerClient,
    digest: str,
    tag: str,
    say: Progress,
    started: float,
    timeout: float | None,
    stop: threading.Event | None,
) -> Iterator[None]:
    """Held while this process builds (or looks up) `digest` on the client's engine; a second
    caller waits, within its own timeout and stop, and then finds the image built."""
    with _builds_lock:
        lock = _builds.setdefault((str(client.api.base_url), digest), threading.Lock())
    if not lock.acquire(blocking=False):
        say(f"waiting for the build of context {digest[:12]} already under way")
        while not lock.acquire(timeout=0.25):
            if stop is not None and stop.is_set():
                raise ImageBuildError(BUILD_STOPPED.format(tag=tag), [])
            if timeout is not None and time.monotonic() - started > timeout:
                raise ImageBuildError(BUILD_TIMED_OUT.format(tag=tag, seconds=f"{timeout:g}"), [])
    try:
        yield
    finally:
        lock.release()


def _build_lines(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    dockerfile: str,
    digest: str,
    nocache: bool,
    buildargs: dict[str, str] | None,
) -> Iterator[str]:
    stream = client.api.build(
        buildargs=buildargs or None,
        path=str(context),
        dockerfile=dockerfile,
        tag=tag,
        rm=True,
        forcerm=True,
        decode=True,
        nocache=nocache,
        labels={LABEL_HASH: digest, LABEL_CONTEXT: context.resolve().name},
    )
    pending = ""
    for chunk in stream:
        if "error" in chunk:
            if pending:
                yield pending
            yield "ERROR: " + str(chunk["error"]).strip()
            return
        pending += str(chunk.get("stream", ""))
        *complete, pending = pending.split("\n")
        for line in complete:
            if line.strip():
                yield line.rstrip()
    if pending.strip():
        yield pending.rstrip()


def list_images(client: docker.DockerClient) -> list[dict[str, object]]:
    """Trimo-built images: tags, context hash, size, age."""
    rows = []
    for img in client.api.images(filters={"label": LABEL_HASH}):
        labels = img.get("Labels") or {}
        rows.append(
            {
                "id": str(img["Id"]).removeprefix("sha256:")[:12],
                "tags": [
                    t
                    for t in img.get("RepoTags") or []
                    if t != "<none>:<none>" and not t.startswith(HASH_REPO + ":")
                ],
                "context_hash": labels.get(LABEL_HASH, "")[:12],
                "size": int(img.get("Size", 0)),
                "created": int(img.get("Created", 0)),
            }
        )
    return sorted(rows, key=lambda r: -int(str(r["created"])))


# -- the Debian image and the base image -------------------------------------------------------


def image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def bootstrap_debian(
    client: docker.DockerClient,
    progress: Progress | None = None,
    image: str = DEBIAN_IMAGE,
    mirror: str | None = None,
    try_pull: bool = True,
) -> bool:
    """Make `debian:bookworm` if the engine lacks it; returns True when something was made."""
    say = progress or (lambda _line: None)
    if image_exists(client, image):
        return False
    if try_pull:
        say(f"pulling {image} ...")
        try:
            repo, _, tag = image.partition(":")
            client.images.pull(repo, tag=tag or "latest")
            return True
        except docker.errors.APIError as exc:
            say(f"pull failed ({str(exc).splitlines()[0][:120]})")
    say(BOOTSTRAP_WHY.format(image=image, suite=DEBIAN_SUITE))
    if shutil.which("debootstrap") is None:
        raise TrimoError(
            "debootstrap is not installed: install it (apt-get install debootstrap) "
            f"or load a Debian image as {image}"
        )
    if os.geteuid() != 0:
        raise TrimoError(f"making {image} with debootstrap needs root: run it with sudo")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trimo-rootfs-") as root:
        cmd = [
            "debootstrap",
            "--variant=minbase",
            DEBIAN_SUITE,
            root,
            mirror or os.environ.get("TRIMO_DEBIAN_MIRROR", DEFAULT_MIRROR),
        ]
        say("$ " + " ".join(cmd))
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith("I: Retrieving") or line.startswith("I: Base system"):
                say(f"[{time.monotonic() - started:5.1f}s] {line.rstrip()}")
        if proc.wait() != 0:
            raise ImageBuildError("debootstrap failed", list(tail))
        say(f"[{time.monotonic() - started:5.1f}s] importing the root filesystem as {image}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        repo, _, tag = image.partition(":")
        client.api.import_image_from_data(tar.stdout, repository=repo, tag=tag or "latest")
        tar.wait()
    say(f"made {image} in {time.monotonic() - started:.1f}s")
    return True


@contextmanager
def base_context(extra_ca_certs: Path | None = None) -> Iterator[Path]:
    """The build context of trimo/base, with the certificates of `extra_ca_certs` (a PEM file).

    They are files of the context, so the content hash, and every image built FROM the base,
    follow them.
    """
    context = images_dir() / "base"
    if extra_ca_certs is None:
        yield context
        return
    try:
        certificates = read_certificates(extra_ca_certs)
    except ValueError as exc:
        raise TrimoError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="trimo-base-") as tmp:
        # Named "base" like the original, so the context's name label does not change.
        ctx = Path(tmp) / "base"
        shutil.copytree(context, ctx, symlinks=True)
        for n, pem in enumerate(certificates):
            (ctx / EXTRA_CA_DIR / f"extra-{n:03d}.crt").write_text(pem, encoding="ascii")
        yield ctx


def ensure_base(
    client: docker.DockerClient,
    progress: Progress | None = None,
    extra_ca_certs: Path | None = None,
) -> BuildResult:
    """`trimo/base:bookworm`, made (Debian bootstrap included) or reused; `extra_ca_certs` joins
    its CA bundle (see `base_context`)."""
    bootstrap_debian(client, progress)
    with base_context(extra_ca_certs) as context:
        return build_image(client, context, tag=BASE_IMAGE, progress=progress)
