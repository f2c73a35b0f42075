"""A recording proxy in front of the Docker engine's socket: what did Trimo ask the engine?"""

from __future__ import annotations

import os
import re
import socket
import threading
from types import TracebackType

from tests.tcp_proxy import pump

_REQUEST = re.compile(rb"(?:^|\r\n)(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


class EngineProxy:
    """Listens on 127.0.0.1 and forwards to the engine's Unix socket, recording request lines."""

    def __init__(self, socket_path: str | None = None) -> None:
        # The engine the tests use: DOCKER_HOST when it names a Unix socket, else the default.
        host = os.environ.get("DOCKER_HOST", "")
        default = (
            host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"
        )
        self.socket_path = socket_path or default
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.socket_path)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        pump(src, dst, self._record if record else None)

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.requests.extend(
                (m.group(1).decode(), m.group(2).decode()) for m in _REQUEST.finditer(data)
            )

    def paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [p for m, p in self.requests if method is None or m == method]

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def __enter__(self) -> EngineProxy:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
