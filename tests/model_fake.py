"""A scripted model server: the Anthropic Messages API and the OpenAI Responses and Chat Completions
APIs, streamed as their documentation describes, on a real socket.

It replays one coding session — read a file, edit it, run the tests, finish — whatever CLI asks:
each request's step is the number of tool calls already in its conversation, so retries and side
calls (titles, summaries) never move the script forward. Every response carries scripted usage,
and the server keeps the totals it reported, which is what Trimo's meter must arrive at.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bot.sample import BAD_LINE, BUG_FILE, GOOD_LINE

WORKSPACE = "/workspace"
TEST_COMMAND = "python3 -m pytest -q tests/test_models.py"
FINAL_MESSAGE = "Page.save built slugs by lowercasing the title; it now uses slug_for. Tests pass."


@dataclass(frozen=True)
class Step:
    """One model turn: a tool call (`read`, `edit`, `run`) or the final message (`finish`)."""

    action: str
    usage_in: int
    usage_out: int
    text: str = ""


SESSION = (
    Step("read", 1200, 40, "Let me look at the model."),
    Step("edit", 1500, 90, "The slug is built by lowercasing; slug_for is the right helper."),
    Step("run", 1800, 30, "Now the tests."),
    Step("finish", 2100, 60, FINAL_MESSAGE),
)
SIDE_USAGE = (20, 5)  # a call outside the session (a title, a summary): small, but metered


@dataclass
class Served:
    """What the server answered: requests by API, usage reported, and the headers it received."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def session_steps(self) -> list[str]:
        return [str(r["step"]) for r in self.requests if r.get("step")]


class ModelFake:
    """The server; `with ModelFake(host) as fake:` serves on `fake.url` until the block ends."""

    def __init__(self, host: str = "127.0.0.1", session: tuple[Step, ...] = SESSION) -> None:
        self.session = session
        self.served = Served()
        self.lock = threading.Lock()
        fake = self

        class Handler(_Handler):
            owner = fake

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ModelFake:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def record(self, api: str, step: str | None, usage: tuple[int, int], headers: Any) -> None:
        with self.lock:
            self.served.requests.append({"api": api, "step": step})
            self.served.input_tokens += usage[0]
            self.served.output_tokens += usage[1]
            self.served.headers.append({k.lower(): v for k, v in headers.items()})


def _sse(event: str | None, data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()


class _Handler(BaseHTTPRequestHandler):
    owner: ModelFake
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Stream events go out as they are written, not held back for the next packet.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        size = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(size) if size else b"{}"
        data = json.loads(raw or b"{}")
        return data if isinstance(data, dict) else {}

    def _json(self, status: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunks: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self._json(404, {"error": {"type": "not_found_error", "message": self.path}})

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._body()
        if path.endswith("/messages/count_tokens"):
            self._json(200, {"input_tokens": 100})
        elif path.endswith("/messages"):
            self._anthropic(body)
        elif path.endswith("/responses"):
            self._responses(body)
        elif path.endswith("/chat/completions"):
            self._chat(body)
        else:
            self._json(404, {"error": {"type": "not_found_error", "message": path}})

    def _step(self, tools: bool, done: int) -> Step | None:
        session = self.owner.session
        if not tools:
            return None
        return session[min(done, len(session) - 1)]

    # -- Anthropic Messages -----------------------------------------------------------------
    def _anthropic(self, body: dict[str, Any]) -> None:
        tools = {t.get("name") for t in body.get("tools") or []}
        done = sum(
            1
            for m in body.get("messages") or []
            if m.get("role") == "assistant"
            and any(
                isinstance(b, dict) and b.get("type") == "tool_use" for b in m.get("content") or []
            )
        )
        step = self._step(bool(tools), done)
        usage_in, usage_out = (step.usage_in, step.usage_out) if step else SIDE_USAGE
        self.owner.record(
            "anthropic", step.action if step else None, (usage_in, usage_out), self.headers
        )
        blocks: list[dict[str, Any]] = []
        text = step.text if step else "Fixing page slugs"
        blocks.append({"type": "text", "text": text})
        if step and step.action != "finish":
            blocks.append(
                {
                    "type": "tool_use",
                    "id": "toolu_" + uuid.uuid4().hex[:20],
                    "name": _anthropic_tool(step.action),
                    "input": _anthropic_input(step.action),
                }
            )
        stop = "tool_use" if len(blocks) > 1 else "end_turn"
        model = str(body.get("model") or "claude-test")
        msg_id = "msg_" + uuid.uuid4().hex[:20]
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {"input_tokens": usage_in, "output_tokens": usage_out},
                },
            )
            return
        chunks = [
            _sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": usage_in,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "output_tokens": 1,
                        },
                    },
                },
            ),
            _sse("ping", {"type": "ping"}),
        ]
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            chunks.append(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": start},
                )
            )
            chunks.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
            chunks.append(
                _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            )
        chunks.append(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": usage_out},
                },
            )
        )
        chunks.append(_sse("message_stop", {"type": "message_stop"}))
        self._stream(chunks)

    # -- OpenAI Responses -------------------------------------------------------------------
    def _responses(self, body: dict[str, Any]) -> None:
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        names = {str(t.get("name")) for t in tools}
        # What the shell tool takes besides the command (e.g. how long to wait for it).
        shell_params = {
            str(p)
            for t in tools
            if t.get("name") == "exec_command"
            for p in ((t.get("parameters") or {}).get("properties") or {})
        }
        done = sum(
            1
            for item in body.get("input") or []
            if isinstance(item, dict)
            and item.get("type") in ("function_call", "custom_tool_call", "local_shell_call")
        )
        step = self._step(bool(tools), done)
        usage_in, usage_out = (step.usage_in, step.usage_out) if step else SIDE_USAGE
        self.owner.record(
            "responses", step.action if step else None, (usage_in, usage_out), self.headers
        )
        model = str(body.get("model") or "gpt-test")
        resp_id = "resp_" + uuid.uuid4().hex[:20]
        items: list[dict[str, Any]] = []
        text = step.text if step else "Fixing page slugs"
        items.append(
            {
                "id": "msg_" + uuid.uuid4().hex[:16],
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
        if step and step.action != "finish":
            name, arguments = _shell_call(names, step.action, shell_params)
            items.append(
                {
                    "id": "fc_" + uuid.uuid4().hex[:16],
                    "type": "function_call",
                    "status": "completed",
                    "call_id": "call_" + uuid.uuid4().hex[:16],
                    "name": name,
                    "arguments": arguments,
                }
            )
        usage = {
            "input_tokens": usage_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage_in + usage_out,
        }
        response = {
            "id": resp_id,
            "object": "response",
            "created_at": 0,
            "status": "completed",
            "model": model,
            "output": items,
            "usage": usage,
        }
        if not body.get("stream"):
            self._json(200, response)
            return
        seq = iter(range(1000))
        chunks = [
            _sse(
                "response.created",
                {
                    "type": "response.created",
                    "sequence_number": next(seq),
                    "response": {**response, "status": "in_progress", "output": [], "usage": None},
                },
            )
        ]
        for index, item in enumerate(items):
            chunks.append(
                _sse(
                    "response.output_item.added",
                    {
                        "type": "response.output_item.added",
                        "sequence_number": next(seq),
                        "output_index": index,
                        "item": {**item, "status": "in_progress"},
                    },
                )
            )
            if item["type"] == "message":
                chunks.append(
                    _sse(
                        "response.output_text.delta",
                        {
                            "type": "response.output_text.delta",
                            "sequence_number": next(seq),
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "delta": text,
                        },
                    )
                )
                chunks.append(
                    _sse(
                        "response.output_text.done",
                        {
                            "type": "response.output_text.done",
                            "sequence_number": next(seq),
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "text": text,
                        },
                    )
                )
            chunks.append(
                _sse(
                    "response.output_item.done",
                    {
                        "type": "response.output_item.done",
                        "sequence_number": next(seq),
                        "output_index": index,
                        "item": item,
                    },
                )
            )
        chunks.append(
            _sse(
                "response.completed",
                {"type": "response.completed", "sequence_number": next(seq), "response": response},
            )
        )
        self._stream(chunks)

    # -- OpenAI Chat Completions ------------------------------------------------------------
    def _chat(self, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        # Aider's prompt carries example conversations of its own: only the script's replies
        # count as steps done.
        texts = tuple(step.text for step in self.owner.session)
        done = sum(
            1
            for m in messages
            if m.get("role") == "assistant" and str(m.get("content") or "").startswith(texts)
        )
        step = self.owner.session[min(done, len(self.owner.session) - 1)]
        text = _chat_reply(step, messages)
        self.owner.record("chat", step.action, (step.usage_in, step.usage_out), self.headers)
        model = str(body.get("model") or "gpt-test")
        chat_id = "chatcmpl-" + uuid.uuid4().hex[:20]
        usage = {
            "prompt_tokens": step.usage_in,
            "completion_tokens": step.usage_out,
            "total_tokens": step.usage_in + step.usage_out,
        }
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": chat_id,
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None, with_usage: bool = False) -> bytes:
            data: dict[str, Any] = {
                "id": chat_id,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
                if not with_usage
                else [],
            }
            if with_usage:
                data["usage"] = usage
            return _sse(None, data)

        chunks = [chunk({"role": "assistant", "content": ""}, None)]
        for start in range(0, len(text), 64):
            chunks.append(chunk({"content": text[start : start + 64]}, None))
        chunks.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(chunk({}, None, with_usage=True))
        chunks.append(_sse(None, "[DONE]"))
        self._stream(chunks)


def _anthropic_tool(action: str) -> str:
    return {"read": "Read", "edit": "Edit", "run": "Bash"}[action]


def _anthropic_input(action: str) -> dict[str, Any]:
    path = f"{WORKSPACE}/{BUG_FILE}"
    if action == "read":
        return {"file_path": path}
    if action == "edit":
        return {"file_path": path, "old_string": BAD_LINE, "new_string": GOOD_LINE}
    return {"command": TEST_COMMAND, "description": "Run the model tests"}


def _shell_command(action: str) -> str:
    if action == "read":
        return f"cat {BUG_FILE}"
    if action == "edit":
        return f"sed -i 's/{BAD_LINE}/{GOOD_LINE}/' {BUG_FILE}"
    return TEST_COMMAND


def _shell_call(names: set[str], action: str, params: set[str] | None = None) -> tuple[str, str]:
    """The shell tool call in whichever shape the CLI offered."""
    command = _shell_command(action)
    if "exec_command" in names:
        args: dict[str, Any] = {"cmd": command, "workdir": WORKSPACE}
        if "yield_time_ms" in (params or set()):
            # Wait for the tests to end, as a model running a test suite asks (Codex caps the
            # wait at 30 s): on a busy machine they outlast the default 10 s, and the call would
            # come back with the process still running.
            args["yield_time_ms"] = 30_000
        return "exec_command", json.dumps(args)
    if "shell_command" in names:
        return "shell_command", json.dumps({"command": command, "workdir": WORKSPACE})
    return "shell", json.dumps({"command": ["bash", "-lc", command], "workdir": WORKSPACE})


def _chat_reply(step: Step, messages: list[dict[str, Any]]) -> str:
    """Aider's side of the session: it edits with SEARCH/REPLACE blocks in the reply text."""
    if step.action == "read":
        return f"{step.text}\n\nPlease add {BUG_FILE} to the chat so I can see it."
    if step.action == "edit":
        return (
            f"{step.text}\n\n{BUG_FILE}\n```python\n<<<<<<< SEARCH\n        {BAD_LINE}\n=======\n"
            f"        {GOOD_LINE}\n>>>>>>> REPLACE\n```\n"
        )
    return step.text


if __name__ == "__main__":
    # `python -m tests.model_fake [HOST]`: serve until stdin closes (benches run it apart).
    import sys

    with ModelFake(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1") as served:
        print(served.url, flush=True)
        sys.stdin.read()
