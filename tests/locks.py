"""Locks the test processes of one machine share (pytest-xdist runs several side by side).

An advisory `flock` on a file in the machine's temporary folder: held by one process at a time,
released when the holder exits however it exits, so a killed worker never leaves a lock behind.
A lock guarding engine state is named after the engine (DOCKER_HOST): sessions on different
engines do not wait for each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_FOLDER = Path(tempfile.gettempdir()) / "trimo-test-locks"
# flock does not exclude threads of one process that open the file each on their own, so
# threads of a process first take a lock of the process's own.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def engine_key() -> str:
    """A short name for the engine the session's fixtures use."""
    url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return hashlib.sha256(url.encode()).hexdigest()[:12]


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Held by one thread of one process on this machine at a time."""
    with _GUARD:
        local = _THREAD_LOCKS.setdefault(name, threading.Lock())
    with local:
        _FOLDER.mkdir(mode=0o777, parents=True, exist_ok=True)
        with (_FOLDER / f"{name}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
