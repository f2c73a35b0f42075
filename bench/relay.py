"""The egress proxy's relay against the network alone: where a proxied download's time goes.

dispatch.py measures a download through a run's proxy against a direct one, on Docker's bridges.
This takes Docker away and asks what limits the proxied path. Four network namespaces joined by
veth pairs, no bridge, no firewall rules, nothing else on the path:

    client ── relay ── server ── direct client

A 50 MB file, sent by the server with sendfile(2), is fetched in alternating rounds:
  direct      the direct client fetches it (one TCP connection, one hop);
  routed      the client fetches it through the relay namespace as a router (the kernel forwards
              packets: one TCP connection, two hops). What the second hop alone costs;
  trimo-proxy through images/proxy/trimo-proxy, run in the relay namespace with a policy that
              names the server an internal host (two TCP connections; the proxy splices);
  tinyproxy   through Debian's tinyproxy in the same place, when it is installed (a well-known
              HTTP proxy of the kind that could have been Trimo's).

Each is reported in MB/s and as a ratio to direct. Needs root (`ip netns`) and curl.

    python bench/relay.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "images" / "proxy" / "trimo-proxy"
DOWNLOAD_MB = 50
TAG = f"trb{os.getpid()}"
NAMES = {role: f"{TAG}{role}" for role in ("s", "r", "c", "d")}
# name: (namespace a, interface a, address a, namespace b, interface b, address b)
LINKS = [
    ("r", "rc", "10.99.1.1/24", "c", "cr", "10.99.1.2/24"),
    ("r", "rs", "10.99.2.1/24", "s", "sr", "10.99.2.2/24"),
    ("d", "ds", "10.99.3.1/24", "s", "sd", "10.99.3.2/24"),
]
SERVER = """
import http.server, os, sys
os.chdir(sys.argv[1])
class Files(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        outputfile.flush()
        self.connection.sendfile(source)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), Files).serve_forever()
"""
TINYPROXY_CONF = """Port 3129
Listen 10.99.1.1
Timeout 600
MaxClients 100
Allow 10.99.1.0/24
DisableViaHeader Yes
LogLevel Critical
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def in_ns(role: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", NAMES[role], *command]


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    made: list[str] = []
    try:
        for name in NAMES.values():
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for a, ia, addr_a, b, ib, addr_b in LINKS:
            ip("link", "add", f"{TAG}{ia}", "type", "veth", "peer", "name", f"{TAG}{ib}")
            for ns, dev, addr in ((a, ia, addr_a), (b, ib, addr_b)):
                ip("link", "set", f"{TAG}{dev}", "netns", NAMES[ns])
                ip("-n", NAMES[ns], "link", "set", f"{TAG}{dev}", "name", dev)
                ip("-n", NAMES[ns], "addr", "add", addr, "dev", dev)
                ip("-n", NAMES[ns], "link", "set", dev, "up")
        # The routed path: the relay namespace forwards between client and server.
        subprocess.run(
            in_ns("r", "sysctl", "-qw", "net.ipv4.ip_forward=1"), check=True, capture_output=True
        )
        ip("-n", NAMES["c"], "route", "add", "10.99.2.0/24", "via", "10.99.1.1")
        ip("-n", NAMES["s"], "route", "add", "10.99.1.0/24", "via", "10.99.2.1")
        # `ip netns exec` shows /etc/netns/<name>/hosts as /etc/hosts: the name "files" is the
        # server, from the proxy's side and from the direct client's.
        for role, address in (("r", "10.99.2.2"), ("d", "10.99.3.2")):
            etc = Path("/etc/netns") / NAMES[role]
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"{address} files\n")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def wait_answers(role: str, url: str, proxy: str | None = None) -> None:
    flags = ["--proxy", proxy] if proxy else ["--noproxy", "*"]
    for _ in range(100):
        done = subprocess.run(
            in_ns(role, "curl", "-sf", "-o", "/dev/null", "-r", "0-0", *flags, url),
            check=False,
            capture_output=True,
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer from {role} (proxy {proxy})")


def fetch_mb_s(role: str, url: str, proxy: str | None) -> float:
    flags = ["--proxy", proxy] if proxy else ["--noproxy", "*"]
    out = subprocess.run(
        in_ns(role, "curl", "-sf", "-o", "/dev/null", "-w", "%{speed_download}", *flags, url),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/relay.py makes network namespaces: run it as root")
    tiny = shutil.which("tinyproxy")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="trimo-relay-") as tmp, namespaces():
        try:
            (Path(tmp) / "blob").write_bytes(bytes(DOWNLOAD_MB * 1024 * 1024))
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            procs.append(
                subprocess.Popen(in_ns("s", sys.executable, "-c", SERVER, tmp), **quiet)  # type: ignore[call-overload]
            )
            policy = {"mode": "allowlist", "allow": ["files"], "internal_hosts": ["files"]}
            procs.append(
                subprocess.Popen(
                    in_ns("r", "/usr/bin/python3", "-I", str(PROXY)),
                    env={**os.environ, "TRIMO_PROXY_POLICY": json.dumps(policy)},
                    **quiet,
                )
            )
            paths: dict[str, tuple[str, str, str | None]] = {
                "direct": ("d", "http://files:8080/blob", None),
                "routed": ("c", "http://10.99.2.2:8080/blob", None),
                "trimo-proxy": ("c", "http://files:8080/blob", "http://10.99.1.1:3128"),
            }
            if tiny:
                conf = Path(tmp) / "tinyproxy.conf"
                conf.write_text(TINYPROXY_CONF)
                procs.append(subprocess.Popen(in_ns("r", tiny, "-d", "-c", str(conf)), **quiet))  # type: ignore[call-overload]
                paths["tinyproxy"] = ("c", "http://10.99.2.2:8080/blob", "http://10.99.1.1:3129")
            for role, url, proxy in paths.values():
                wait_answers(role, url, proxy)
            speeds: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (role, url, proxy) in paths.items():
                    speeds[name].append(fetch_mb_s(role, url, proxy))
        finally:
            for proc in procs:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    direct = medians["direct"]
    result = {
        "bench": "relay",
        "rounds": args.rounds,
        "download_mb": DOWNLOAD_MB,
        **{f"{name}_mb_s": round(m, 1) for name, m in medians.items()},
        **{f"{name}_ratio": round(m / direct, 2) for name, m in medians.items()},
        "runs_mb_s": {name: [round(x, 1) for x in values] for name, values in speeds.items()},
    }
    print(json.dumps(result))
    for name, m in medians.items():
        print(f"{name:12} {m:8.1f} MB/s  {m / direct:.2f}x direct (medians of {args.rounds})")
    if not tiny:
        print("tinyproxy is not installed (apt-get install tinyproxy): its row is left out")


if __name__ == "__main__":
    main()
