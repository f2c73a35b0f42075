"""Each CLI's output, as the real CLIs print it (lines recorded from Claude Code 2.1.332, Codex
0.171.0 and Aider 0.86.2 against the scripted model server), becomes readable steps."""

from __future__ import annotations

import json

from bot.agents import PRESETS
from bot.agents.transcript import Parser, Step


def _steps(parser: Parser, lines: list[str]) -> list[Step]:
    out: list[Step] = []
    for line in lines:
        got = parser.feed(line)
        if got:
            out.extend(got)
    return out


def test_claude_code_stream_json() -> None:
    read_id, bash_id = "toolu_d1c3a474011e4f9dbd1d", "toolu_c9a89f1f6fb049d784cf"
    lines = [
        json.dumps({"type": "system", "subtype": "init", "cwd": "/workspace", "tools": ["Bash"]}),
        json.dumps(
            {
                "type": "assistant",
                "message": {"content": [{"type": "text", "text": "Let me look at the model."}]},
            }
        ),
        json.dumps(
            {
                "type": "assistant",
                "message": {
                    "content": [
                        {
                            "type": "tool_use",
                            "id": read_id,
                            "name": "Read",
                            "input": {"file_path": "/workspace/pages/models.py"},
                        }
                    ]
                },
            }
        ),
        json.dumps(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "tool_use_id": read_id,
                            "type": "tool_result",
                            "content": '1\t"""The Page model.',
                        }
                    ],
                },
            }
        ),
        json.dumps(
            {
                "type": "assistant",
                "message": {
                    "content": [
                        {
                            "type": "tool_use",
                            "id": bash_id,
                            "name": "Bash",
                            "input": {
                                "command": "python3 -m pytest -q",
                                "description": "Run the tests",
                            },
                        }
                    ]
                },
            }
        ),
        json.dumps(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "content": "Exit code 1\n/usr/bin/python3: No module named pytest",
                            "is_error": True,
                            "tool_use_id": bash_id,
                        }
                    ],
                },
            }
        ),
        "Some plain line the CLI printed",
        json.dumps(
            {
                "type": "result",
                "subtype": "success",
                "is_error": False,
                "num_turns": 3,
                "result": "Done: slug_for builds slugs.",
                "total_cost_usd": 0.0231,
                "usage": {"input_tokens": 6600, "output_tokens": 220},
            }
        ),
    ]
    parser = PRESETS["claude-code"].parser()
    assert parser.feed("Some plain line the CLI printed") is None
    steps = _steps(parser, lines)
    assert [s.describe() for s in steps] == [
        "agent: Let me look at the model.",
        "read /workspace/pages/models.py",
        "ran `python3 -m pytest -q` → exit 1",
        "finished: Done: slug_for builds slugs.",
    ]
    assert steps[-1].extra == {
        "turns": 3,
        "cost_usd": 0.0231,
        "input_tokens": 6600,
        "output_tokens": 220,
    }
    assert steps[2].ok is False and "No module named pytest" in steps[2].text


def test_claude_code_error_result_is_an_error_step() -> None:
    line = json.dumps(
        {
            "type": "result",
            "subtype": "error_during_execution",
            "is_error": True,
            "result": "API Error: 402 budget spent",
        }
    )
    (step,) = PRESETS["claude-code"].parser().feed(line) or []
    assert step.kind == "error" and step.describe() == "error: API Error: 402 budget spent"


def test_codex_exec_json() -> None:
    def done(item: dict[str, object]) -> str:
        return json.dumps({"type": "item.completed", "item": item})

    lines = [
        '{"type":"thread.started","thread_id":"01a233c4"}',
        '{"type":"turn.started"}',
        done({"id": "item_1", "type": "agent_message", "text": "Let me look at the model."}),
        '{"type":"item.started","item":{"id":"item_2","type":"command_execution"}}',
        done(
            {
                "id": "item_2",
                "type": "command_execution",
                "command": "/bin/bash -lc 'cat pages/models.py'",
                "aggregated_output": "...",
                "exit_code": 0,
                "status": "completed",
            }
        ),
        done(
            {
                "id": "item_4",
                "type": "command_execution",
                "command": "/bin/bash -lc \"sed -i 's/a/b/' pages/models.py\"",
                "aggregated_output": "",
                "exit_code": 0,
                "status": "completed",
            }
        ),
        done(
            {
                "id": "item_6",
                "type": "command_execution",
                "command": "/bin/bash -lc 'python3 -m pytest -q tests/test_models.py'",
                "aggregated_output": "1 failed",
                "exit_code": 1,
                "status": "failed",
            }
        ),
        done(
            {
                "id": "item_8",
                "type": "file_change",
                "status": "completed",
                "changes": [{"path": "/workspace/a.py", "kind": "update"}],
            }
        ),
        '{"type":"turn.completed","usage":{"input_tokens":6600,"output_tokens":220}}',
    ]
    steps = _steps(PRESETS["codex"].parser(), lines)
    assert [s.describe() for s in steps] == [
        "agent: Let me look at the model.",
        "read pages/models.py → exit 0",
        "edited pages/models.py → exit 0",
        "ran `python3 -m pytest -q tests/test_models.py` → exit 1",
        "edited /workspace/a.py",
        "finished: turn completed",
    ]


def test_aider_terminal_lines() -> None:
    lines = [
        "Aider v0.86.2",
        "Let me look at the model.",
        "Please add pages/models.py to the chat so I can see it.",
        "Tokens: 1.2k sent, 40 received. Cost: $0.0027 message, $0.0027 session.",
        "",
        "pages/models.py",
        "Add file to the chat? (Y)es/(N)o/(D)on't ask again [Yes]: y",
        "The slug is built by lowercasing; slug_for is the right helper.",
        "pages/models.py",
        "<<<<<<< SEARCH",
        "Tokens: 1.5k sent, 90 received. Cost: $0.0037 message, $0.0064 session.",
        "Applied edit to pages/models.py",
        "11 passed in 0.52s",
        '{"type": "aider.test", "command": "python3 -m pytest", "exit_code": 0}',
    ]
    steps = _steps(PRESETS["aider"].parser(), lines)
    tools = [s.describe() for s in steps if s.kind == "tool"]
    assert tools == [
        "read pages/models.py",
        "edited pages/models.py",
        "ran `python3 -m pytest` → exit 0",
    ]
