"""Network probes a test agent runs inside a run's container (copied into the test repository).

Python's standard library only. Each prints one `probe: {json}` line. Every destination is on
this machine: another run's address, the run's own gateway, or a name the proxy is asked about.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sys
import time

PORTS = [*range(1, 1025), 3128, 5432, 6379, 8000, 8080]


def say(kind: str, **data: object) -> None:
    print("probe: " + json.dumps({"probe": kind, **data}), flush=True)


def error_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__


async def _connect(host: str, port: int, sem: asyncio.Semaphore) -> tuple[int, str]:
    async with sem:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            return port, error_name(exc)
        writer.close()
        return port, "connected"


async def _ports(host: str) -> dict[str, list[int]]:
    sem = asyncio.Semaphore(2000)
    results = await asyncio.gather(*(_connect(host, p, sem) for p in PORTS))
    by_outcome: dict[str, list[int]] = {}
    for port, outcome in results:
        by_outcome.setdefault(outcome, []).append(port)
    return by_outcome


def gateway() -> str | None:
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    return None


def own_address() -> str:
    # UDP connect sends nothing: it asks the kernel which source address a route would use.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((gateway() or "127.0.0.1", 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def ask_proxy(target: str) -> dict[str, object]:
    """CONNECT `target` through the run's proxy; the proxy's status line and how long it took."""
    proxy = os.environ["HTTPS_PROXY"].removeprefix("http://").rstrip("/")
    host, port = proxy.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status = s.makefile("rb").readline().decode().strip()
    return {"target": target, "status": status, "seconds": round(time.monotonic() - started, 3)}


def main() -> None:
    what = sys.argv[1]
    if what == "address":
        say("address", address=own_address())
    elif what == "ports":
        started = time.monotonic()
        found = asyncio.run(_ports(sys.argv[2]))
        say("ports", target=sys.argv[2], outcomes=found, seconds=time.monotonic() - started)
    elif what == "route":
        gw = gateway()
        if gw is not None:
            # The way out, on the run's own network: nobody owns it, so the kernel gives up.
            kind, target = socket.SOCK_STREAM, gw
        else:
            # No route at all: a UDP connect() only looks the route up and sends nothing.
            kind, target = socket.SOCK_DGRAM, "169.254.169.254"
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(10)
            try:
                s.connect((target, 80))
                outcome = "connected"
            except OSError as exc:
                outcome = error_name(exc)
        say("route", gateway=gw, target=target, connect=outcome)
    elif what == "proxy":
        say("proxy", answers=[ask_proxy(t) for t in sys.argv[2:]])


if __name__ == "__main__":
    main()
