"""A PostgreSQL cluster of a test's own (initdb + pg_ctl into a temporary folder, on a port of
its own), so a test can stop and restart it under load without disturbing anyone else's.

Made as scripts/setup's ensure_postgres makes the shared one, but durable: `fsync` and
`synchronous_commit` stay on, since what a test restarts it for is whether committed data
survive (an immediate shutdown is a crash for PostgreSQL; what it acknowledged must be there).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

NO_POSTGRES = "no PostgreSQL binaries in /usr/lib/postgresql (Debian's postgresql package)"
START_TIMEOUT = 60


def _bin() -> Path | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin/pg_ctl") if p.is_file()),
        key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()],
    )
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    folder: Path
    port: int
    password: str
    bin: Path
    as_owner: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://trimo:{self.password}@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, timeout: float = START_TIMEOUT + 10) -> None:
        subprocess.run(
            [*self.as_owner, str(self.bin / "pg_ctl"), *args, "-D", str(self.folder / "data")],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "server.log")
        self._ctl("start", "-w", "-t", str(START_TIMEOUT), "-l", log, "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-t", str(START_TIMEOUT), "-m", mode)

    def restart(self, mode: str = "immediate") -> None:
        """Stop the server (`immediate`: as if it crashed) and start it again."""
        self.stop(mode)
        self.start()


@contextmanager
def own_cluster() -> Iterator[Cluster]:
    """A fresh cluster, started; stopped and removed afterwards."""
    binaries = _bin()
    if binaries is None:
        pytest.skip(NO_POSTGRES)
    # Not under pytest's tmp_path: its parents are private to this user, and as root the
    # server runs as another.
    folder = Path(tempfile.mkdtemp(prefix="trimo-pg-"))
    as_owner: list[str] = []
    if os.getuid() == 0:
        # PostgreSQL refuses to run as root: as root, the cluster is the postgres user's.
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    try:
        yield from _cluster(folder, binaries, as_owner)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cluster(folder: Path, binaries: Path, as_owner: list[str]) -> Iterator[Cluster]:
    password = secrets.token_hex(12)
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    if as_owner:
        shutil.chown(pwfile, "postgres")
    subprocess.run(
        [
            *as_owner,
            str(binaries / "initdb"),
            "-D",
            str(folder / "data"),
            "-U",
            "trimo",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    cluster = Cluster(folder, _free_port(), password, binaries, as_owner)
    cluster.start()
    try:
        yield cluster
    finally:
        with suppress(subprocess.CalledProcessError):  # not running: a test stopped it
            cluster.stop("immediate")
