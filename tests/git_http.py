"""GitHub's git remote over HTTP for tests: `git http-backend` behind a real loopback server.

Pushes and fetches authenticate as GitHub's do for an App: Basic auth with the user
`x-access-token` and an installation token as the password. The token must be one the fake
GitHub handed out and still valid on its clock, else the answer is 401, as GitHub's would be.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

BACKEND = (
    Path(
        subprocess.run(
            ["git", "--exec-path"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    / "git-http-backend"
)


@dataclass
class GitHttp:
    """What the server saw: the tokens each push came with, and refusals to make."""

    root: Path
    token_valid: Callable[[str], bool]
    url: str = ""
    pushes: list[tuple[str, int]] = field(default_factory=list)  # (token, HTTP status)
    refuse_pushes: int = 0  # answer this many more pushes with 401 whatever the token

    def repo_url(self, repo: str) -> str:
        return f"{self.url}/{repo}.git"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        token = _token(environ.get("HTTP_AUTHORIZATION", ""))
        service = environ.get("QUERY_STRING", "") + environ.get("PATH_INFO", "")
        pushing = "git-receive-pack" in service
        status = 200
        if token is None or not self.token_valid(token):
            status = 401
        elif pushing and environ["REQUEST_METHOD"] == "POST" and self.refuse_pushes > 0:
            self.refuse_pushes -= 1
            status = 401
        if pushing and environ["REQUEST_METHOD"] == "POST":
            self.pushes.append((token or "", status))
        if status == 401:
            start_response(
                "401 Unauthorized",
                [("WWW-Authenticate", 'Basic realm="GitHub"'), ("Content-Type", "text/plain")],
            )
            return [b"Invalid username or token.\n"]
        return self._backend(environ, start_response)

    def _backend(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        stream = environ["wsgi.input"]
        if length:
            body = stream.read(length)
        elif environ.get("wsgi.input_terminated"):  # chunked: the server marks its end
            body = stream.read()
        else:
            body = b""
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            # http-backend allows receive-pack only for an authenticated user.
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "PATH_INFO": environ.get("PATH_INFO", ""),
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        if environ.get("HTTP_CONTENT_ENCODING"):
            env["HTTP_CONTENT_ENCODING"] = environ["HTTP_CONTENT_ENCODING"]
        if environ.get("HTTP_GIT_PROTOCOL"):
            env["GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        out = subprocess.run(
            [str(BACKEND)], input=body, env=env, capture_output=True, timeout=60, check=False
        ).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name, value.strip()))
        start_response(status, headers)
        return [rest]


def _token(header: str) -> str | None:
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(credential).decode().partition(":")
    except ValueError:
        return None
    return password if user == "x-access-token" else None


@contextmanager
def serve_git(root: Path, token_valid: Callable[[str], bool]) -> Iterator[GitHttp]:
    """Serve the bare repositories under `root` (as `<owner>/<name>.git`) on a loopback port."""
    app = GitHttp(root, token_valid)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    app.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app
    finally:
        server.shutdown()
        thread.join(timeout=10)
