"""The network policy without a container: modes within the server's limits, refusals reported."""

from __future__ import annotations

import json

from bot.network import (
    PRESETS,
    Blocked,
    NetworkLimits,
    NetworkMode,
    blocked_markdown,
    parse_proxy_line,
    resolve_policy,
    summarize,
)


def test_presets_and_allow_join_the_servers_hosts_and_deny_wins_in_the_proxy_policy() -> None:
    limits = NetworkLimits(allow=("mirror.corp",), deny=("*.paste.example",))
    policy = resolve_policy(
        NetworkMode.ALLOWLIST, ["pypi"], ["API.example.com"], limits, ["1.2.3.4"]
    )
    assert policy.mode == NetworkMode.ALLOWLIST
    assert list(policy.allow) == [*PRESETS["pypi"], "api.example.com", "mirror.corp"]
    assert policy.sources["pypi.org"] == "network.presets: pypi"
    assert policy.sources["mirror.corp"] == "server network_allow"
    sent = json.loads(policy.proxy_json())
    assert sent["deny"] == ["*.paste.example"] and sent["host_addresses"] == ["1.2.3.4"]
    assert policy.notes == ()


def test_the_server_caps_the_mode_and_says_so() -> None:
    capped = resolve_policy(
        NetworkMode.OPEN, [], [], NetworkLimits(max_mode=NetworkMode.ALLOWLIST), []
    )
    assert capped.mode == NetworkMode.ALLOWLIST
    assert capped.notes == (
        "network: the repository asks for mode open; the server allows at most allowlist, "
        "so the run gets allowlist",
    )
    none = resolve_policy(NetworkMode.OPEN, [], [], NetworkLimits(max_mode=NetworkMode.NONE), [])
    assert none.mode == NetworkMode.NONE
    # Asking for less than the cap is nothing to mention.
    assert resolve_policy(NetworkMode.NONE, [], [], NetworkLimits(), []).notes == ()


def test_refusals_become_log_lines_and_counted_rows_with_the_line_that_allows_each() -> None:
    lines = [
        '{"event":"listening","port":3128,"mode":"allowlist"}',
        '{"event":"blocked","method":"CONNECT","host":"example.org","port":443,'
        '"rule":"allow","reason":"not in network.allow"}',
        "not json at all",
        '{"event":"blocked","method":"GET","host":"example.org","port":80,'
        '"rule":"allow","reason":"not in network.allow"}',
        '{"event":"blocked","method":"CONNECT","host":"169.254.169.254","port":80,'
        '"rule":"address","reason":"169.254.169.254 is a link-local address"}',
        '{"event":"blocked","method":"CONNECT"}',
    ]
    blocked = [b for b in map(parse_proxy_line, lines) if b is not None]
    assert len(blocked) == 3
    assert blocked[0].log_line() == (
        "network: blocked CONNECT example.org:443 — not in network.allow"
    )
    rows = summarize(blocked)
    assert [(r["host"], r["count"]) for r in rows] == [("example.org", 2), ("169.254.169.254", 1)]
    assert rows[0]["fix"] == 'network: {allow: ["example.org"]}  # in .trimo/config.yml'
    assert rows[1]["fix"].startswith('network_internal_hosts = ["169.254.169.254"]')
    table = "\n".join(blocked_markdown(rows))
    assert "| `example.org:443` | 2 | not in network.allow |" in table
    assert blocked_markdown([]) == []


def test_a_denied_host_has_no_config_line_to_offer() -> None:
    row = summarize([Blocked("CONNECT", "x.paste.example", 443, "deny", "denied")])[0]
    assert row["fix"] == "denied by the server (network_deny): ask its administrator"
