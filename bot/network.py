"""The network policy of a run: its mode, the hosts it may reach, and what was refused.

Leaf module. A repository asks (`network:` in `.trimo/config.yml`), the server decides (hosts for
every repository, hosts denied, the widest mode allowed); the result is the policy the egress
proxy beside the run enforces. The proxy's refusals come back as JSON lines in its log and become
the run's `network: blocked ...` log lines and the report's list of blocked hosts.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class NetworkMode(StrEnum):
    NONE = "none"  # no network at all
    ALLOWLIST = "allowlist"  # the proxy lets named hosts through
    OPEN = "open"  # the proxy lets every public host through


# Widest last: a server caps a repository's mode at its own `network_max_mode`.
MODE_ORDER = (NetworkMode.NONE, NetworkMode.ALLOWLIST, NetworkMode.OPEN)

# Documented host lists a repository names in `network.presets`.
PRESETS: dict[str, tuple[str, ...]] = {
    "debian": ("deb.debian.org", "security.debian.org", "snapshot.debian.org"),
    "pypi": ("pypi.org", "files.pythonhosted.org", "pypi.python.org"),
    "npm": ("registry.npmjs.org", "registry.yarnpkg.com"),
    "go": ("proxy.golang.org", "sum.golang.org", "index.golang.org"),
    "crates": ("crates.io", "index.crates.io", "static.crates.io", "static.rust-lang.org"),
    "rubygems": ("rubygems.org", "index.rubygems.org", "*.rubygems.org"),
    "maven": (
        "repo.maven.apache.org",
        "repo1.maven.org",
        "plugins.gradle.org",
        "services.gradle.org",
    ),
    "github": (
        "github.com",
        "api.github.com",
        "codeload.github.com",
        "objects.githubusercontent.com",
        "raw.githubusercontent.com",
    ),
}
DEFAULT_PRESETS = ("debian", "pypi", "npm")

PROXY_ALIAS = "trimo-proxy"  # the proxy's name on the run's network
PROXY_PORT = 3128
NO_PROXY = "localhost,127.0.0.1,::1"

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_PATTERN = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
HOST_EXPECTED = "a host name like api.example.com or *.example.com (no scheme, path or port)"
BLOCKED_LINE = "network: blocked {method} {host}:{port} — {reason}"
# The run event recorded for each refused connection (the run page lists them, /metrics counts).
EGRESS_DENIED = "egress_denied"


def valid_host_pattern(value: str) -> bool:
    if HOST_PATTERN.match(value):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def cap_mode(asked: NetworkMode, widest: NetworkMode) -> NetworkMode:
    return min(asked, widest, key=MODE_ORDER.index)


@dataclass(frozen=True)
class NetworkPolicy:
    """What the proxy of one run enforces (mode NONE: there is no proxy)."""

    mode: NetworkMode
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    internal_hosts: tuple[str, ...] = ()
    host_addresses: tuple[str, ...] = ()
    # Where each allowed pattern came from, for the log ("network.presets: pypi", ...).
    sources: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def proxy_json(self) -> str:
        return json.dumps(
            {
                "mode": self.mode.value,
                "allow": list(self.allow),
                "deny": list(self.deny),
                "internal_hosts": list(self.internal_hosts),
                "host_addresses": list(self.host_addresses),
            },
            separators=(",", ":"),
        )

    def describe(self) -> str:
        if self.mode == NetworkMode.NONE:
            return "network: none (no route out, no proxy)"
        if self.mode == NetworkMode.OPEN:
            return "network: open (every public host, through the egress proxy)"
        return f"network: allowlist ({len(self.allow)} host patterns, through the egress proxy)"


@dataclass(frozen=True)
class NetworkLimits:
    """The server's side: settings network_allow, _deny, _internal_hosts and _max_mode."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    internal_hosts: tuple[str, ...] = ()
    max_mode: NetworkMode = NetworkMode.OPEN


def resolve_policy(
    mode: NetworkMode,
    presets: list[str],
    allow: list[str],
    limits: NetworkLimits,
    host_addresses: list[str],
) -> NetworkPolicy:
    """The repository's request within the server's limits."""
    notes = []
    effective = cap_mode(mode, limits.max_mode)
    if effective != mode:
        notes.append(
            f"network: the repository asks for mode {mode.value}; the server allows at most "
            f"{limits.max_mode.value}, so the run gets {effective.value}"
        )
    sources: dict[str, str] = {}
    for name in presets:
        for host in PRESETS[name]:
            sources.setdefault(host, f"network.presets: {name}")
    for host in allow:
        sources.setdefault(host.lower(), "network.allow")
    for host in limits.allow:
        sources.setdefault(host.lower(), "server network_allow")
    return NetworkPolicy(
        mode=effective,
        allow=tuple(sources),
        deny=tuple(h.lower() for h in limits.deny),
        internal_hosts=tuple(h.lower() for h in limits.internal_hosts),
        host_addresses=tuple(host_addresses),
        sources=sources,
        notes=tuple(notes),
    )


# -- what the proxy refused ---------------------------------------------------------------------


@dataclass(frozen=True)
class Blocked:
    """One refusal the proxy reported."""

    method: str
    host: str
    port: int
    rule: str  # allow | deny | address | dns | connect | request
    reason: str

    def log_line(self) -> str:
        return BLOCKED_LINE.format(
            method=self.method, host=self.host, port=self.port, reason=self.reason
        )


def parse_proxy_line(line: str) -> Blocked | None:
    """A refusal from a line of the proxy's log, None for anything else."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("event") != "blocked":
        return None
    try:
        return Blocked(
            method=str(data["method"]),
            host=str(data["host"]),
            port=int(data["port"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def fix_for(blocked: Blocked) -> str:
    """The exact configuration line that would let this host through, or what to ask for."""
    if blocked.rule == "allow":
        return f'network: {{allow: ["{blocked.host}"]}}  # in .trimo/config.yml'
    if blocked.rule == "address":
        return f'network_internal_hosts = ["{blocked.host}"]  # server setting, if it is yours'
    if blocked.rule == "deny":
        return "denied by the server (network_deny): ask its administrator"
    return "not a policy refusal: check the host name and that it answers"


def summarize(blocked: list[Blocked]) -> list[dict[str, Any]]:
    """Blocked hosts with counts, most refused first, each with the line that would allow it."""
    counts = Counter((b.host, b.rule) for b in blocked)
    first: dict[tuple[str, str], Blocked] = {}
    for b in blocked:
        first.setdefault((b.host, b.rule), b)
    rows = []
    for (host, rule), count in counts.most_common():
        b = first[(host, rule)]
        rows.append(
            {
                "host": host,
                "port": b.port,
                "count": count,
                "rule": rule,
                "reason": b.reason,
                "fix": fix_for(b),
            }
        )
    return rows


def blocked_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section on blocked hosts (empty when nothing was refused)."""
    if not rows:
        return []
    lines = [
        "**Network: blocked hosts**",
        "",
        "| host | times | why | to allow it |",
        "| --- | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['host']}:{row['port']}` | {row['count']} | {row['reason']} | `{row['fix']}` |"
        )
    return lines


def blocked_text(rows: list[dict[str, Any]]) -> list[str]:
    """The same for a terminal."""
    lines = []
    for row in rows:
        lines.append(f"  {row['host']}:{row['port']} {row['count']} time(s) — {row['reason']}")
        lines.append(f"      to allow: {row['fix']}")
    return lines
