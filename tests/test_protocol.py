"""Both sides of the container protocol agree: bot/protocol.py and the runner in the base image."""

from __future__ import annotations

import ast
from pathlib import Path

from bot import protocol
from bot.protocol import ExitCode, format_event, parse_line

RUNNER = Path(__file__).resolve().parents[1] / "images" / "base" / "trimo-runner"


def _runner_constants() -> dict[str, object]:
    tree = ast.parse(RUNNER.read_text())
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return found


def test_runner_and_daemon_share_paths_and_prefix() -> None:
    c = _runner_constants()
    assert c["EVENT_PREFIX"] == protocol.EVENT_PREFIX
    assert c["WORKSPACE"] == protocol.WORKSPACE
    assert c["IN_DIR"] == protocol.IN_DIR
    assert c["OUT_DIR"] == protocol.OUT_DIR
    assert c["AGENT_OUT_DIR"] == protocol.AGENT_OUT_DIR
    assert c["TESTS_OUT_DIR"] == protocol.TESTS_OUT_DIR
    assert c["BUNDLE_NAME"] == protocol.BUNDLE_NAME
    assert c["SUMMARY_NAME"] == protocol.SUMMARY_NAME
    assert c["AGENT_UID"] == protocol.AGENT_UID


def test_runner_and_daemon_share_exit_codes() -> None:
    c = _runner_constants()
    for code in ExitCode:
        assert c[f"EXIT_{code.name}"] == code.value, code


def test_event_lines_round_trip_and_plain_lines_are_logs() -> None:
    ev = parse_line(format_event("phase", phase="agent"))
    assert ev is not None and ev.kind == "phase" and ev.data["phase"] == "agent"
    assert parse_line("collecting 3 items") is None
    assert parse_line(protocol.EVENT_PREFIX + " {not json") is None
    assert parse_line(protocol.EVENT_PREFIX + ' ["no", "object"]') is None
