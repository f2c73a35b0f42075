"""The run pages without a browser: the list's filters and pages, the live log's resumption,
CSRF on the buttons."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from bot.settings import Settings
from bot.states import LIVE, PipelineKind, RunState
from bot.store import Store
from ui.app import create_app


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(Store.sqlite_url(tmp_path))
    yield s
    s.close()


@pytest.fixture
def app(tmp_path: Path, store: Store) -> Flask:
    app = create_app(Settings(data_dir=tmp_path), store)
    app.config["TESTING"] = True
    return app


def _runs(store: Store, repo: str, count: int) -> list[int]:
    pipeline = store.get_or_create_pipeline(
        repo=repo, key=f"local:{repo}", kind=PipelineKind.LOCAL, branch="trimo/1-x", title="x"
    )
    return [store.create_run(pipeline.id, trigger="cli", task="t").id for _ in range(count)]


def test_the_list_filters_by_repository_and_state_and_pages_back(app: Flask, store: Store) -> None:
    a = _runs(store, "/src/a", 60)
    b = _runs(store, "/src/b", 3)
    store.set_state(b[0], RunState.FAILED, expect=LIVE, reason="tests failed")
    client = app.test_client()

    first = client.get("/runs?repo=/src/a").get_data(as_text=True)
    assert first.count('class="run"') == 50
    assert f'data-run="{a[-1]}"' in first and f'data-run="{b[0]}"' not in first
    older = client.get(f"/runs?repo=/src/a&before={a[-50]}").get_data(as_text=True)
    assert older.count('class="run"') == 10 and "Older runs" not in older

    failed = client.get("/runs?state=failed").get_data(as_text=True)
    assert failed.count('class="run"') == 1 and f'data-run="{b[0]}"' in failed
    assert client.get("/runs/999999").status_code == 404


def test_a_button_without_its_csrf_token_is_refused(app: Flask, store: Store) -> None:
    (run_id,) = _runs(store, "/src/a", 1)
    app.config["TESTING"] = False
    response = app.test_client().post(f"/runs/{run_id}/stop")
    assert response.status_code == 400
    assert store.get_run(run_id).state == RunState.QUEUED


def test_the_live_log_resumes_after_last_event_id_and_ends_with_the_run(
    app: Flask, store: Store
) -> None:
    (run_id,) = _runs(store, "/src/a", 1)
    store.set_state(run_id, RunState.AGENT, expect=LIVE)
    store.add_logs(run_id, [f"line {i}" for i in range(5)])
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/runs/{run_id}/events"
    try:
        ids = [e.id for e in store.events(run_id, kinds=["log"])]

        def finish() -> None:
            store.add_logs(run_id, ["line 5"])
            store.set_state(run_id, RunState.SUCCEEDED, expect=LIVE)

        timer = threading.Timer(0.5, finish)
        timer.start()
        with requests.get(
            url, headers={"Last-Event-ID": str(ids[2])}, stream=True, timeout=10
        ) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            body = r.text  # the stream ends when the run has finished and all was sent
        timer.join()
    finally:
        server.shutdown()
    logs = [
        line.removeprefix("data: ").strip('"')
        for block in body.split("\n\n")
        if "event: log" in block
        for line in block.splitlines()
        if line.startswith("data: ")
    ]
    assert logs == ["line 3", "line 4", "line 5"]
    assert '"message": "succeeded"' in body and "event: end" in body


def test_past_the_stream_limit_a_browser_is_told_to_come_back(app: Flask, store: Store) -> None:
    (run_id,) = _runs(store, "/src/a", 1)
    ui = app.extensions["trimo.ui"]
    ui.streams = threading.BoundedSemaphore(1)
    assert ui.streams.acquire(blocking=False)  # the one stream slot is taken
    answer = app.test_client().get(f"/runs/{run_id}/events")
    assert answer.status_code == 200 and answer.get_data(as_text=True) == "retry: 3000\n\n"
    ui.streams.release()
