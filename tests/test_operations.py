"""Operations: /metrics in Prometheus' format, /healthz that looks at the workers, JSON logs."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from bot.github.client import CALLS
from bot.health import StatusWriter, read_statuses
from bot.logs import about_delivery, about_run, configure
from bot.metrics import RunMetrics
from bot.network import EGRESS_DENIED
from bot.settings import Settings
from bot.states import LIVE, PipelineKind, RunState
from bot.store import Store
from tests.conftest import GITHUB_FIXTURES
from webhooks.app import create_app

SECRET = "operations-secret"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(Store.sqlite_url(tmp_path))
    yield s
    s.close()


def _app(tmp_path: Path, store: Store, **kw: object) -> Flask:
    settings = Settings(data_dir=tmp_path, webhook_secrets=[SECRET], app_id=1)
    return create_app(
        settings,
        store,
        metrics=RunMetrics(store, tmp_path),
        workers=lambda: read_statuses(tmp_path),
        **kw,  # type: ignore[arg-type]
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _deliver(client: object, body: bytes, secret: str = SECRET) -> int:
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    response = client.post(  # type: ignore[attr-defined]
        "/webhooks/github",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "issues",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sig,
        },
    )
    return int(response.status_code)


def test_metrics_count_runs_phases_deliveries_github_calls_and_denials(
    tmp_path: Path, store: Store
) -> None:
    pipeline = store.get_or_create_pipeline(
        repo="octo/hello", key="issue:1", kind=PipelineKind.ISSUE, branch="trimo/1-x", title="x"
    )
    done = store.create_run(pipeline.id, trigger="label", task="t")
    for state in (RunState.PREPARING, RunState.AGENT, RunState.SUCCEEDED):
        store.set_state(done.id, state, expect=LIVE)
    store.create_run(pipeline.id, trigger="label", task="t")  # waits in the queue
    store.add_event(done.id, EGRESS_DENIED, "example.org:443", {"host": "example.org"})
    CALLS.record("GET", "ok", {"X-RateLimit-Remaining": "4321"})
    StatusWriter(tmp_path, "host:1:2", lambda: None).write()
    app = _app(tmp_path, store)
    client = app.test_client()
    body = (GITHUB_FIXTURES / "webhooks" / "issues.labeled.json").read_bytes()
    assert _deliver(client, body) in (200, 202)
    assert _deliver(client, body, secret="wrong") == 401

    samples = _samples(client.get("/metrics").get_data(as_text=True))
    assert samples[("trimo_runs", (("repo", "octo/hello"), ("state", "succeeded")))] == 1
    assert samples[("trimo_runs", (("repo", "octo/hello"), ("state", "queued")))] == 1
    assert samples[("trimo_queue_depth", ())] == 1
    assert samples[("trimo_phase_duration_seconds_count", (("phase", "agent"),))] == 1
    assert samples[("trimo_phase_duration_seconds_count", (("phase", "preparing"),))] == 1
    assert samples[("trimo_egress_denials_total", ())] == 1
    assert samples[("trimo_github_rate_limit_remaining", ())] == 4321
    assert samples[("trimo_github_calls_total", (("outcome", "ok"), ("verb", "GET")))] >= 1
    outcomes = {
        labels: v for (name, labels), v in samples.items() if name == "trimo_deliveries_total"
    }
    assert sum(outcomes.values()) == 2
    assert outcomes[(("event", "unverified"), ("outcome", "bad_signature"))] == 1
    assert samples[("trimo_outbox_reports", (("state", "pending"),))] == 0

    # The inbox: one delivery failed for good, one went through on its second attempt, one
    # waits for its retry.
    while (delivery := store.claim_delivery("w")) is not None:  # the webhook's, if it queued
        store.finish_delivery(delivery.delivery_id, owner="w")
    for name in ("d-failed", "d-retried", "d-waiting"):
        store.record_delivery(name, "issues", "labeled", "[1]")

    def claim(name: str) -> None:
        delivery = store.claim_delivery("w")
        assert delivery is not None and delivery.delivery_id == name

    claim("d-failed")
    store.finish_delivery("d-failed", "gave up after 1 attempt", owner="w")
    claim("d-retried")
    store.retry_delivery_later("d-retried", "HTTP 502", timedelta(0), "w")
    claim("d-retried")
    store.finish_delivery("d-retried", owner="w")
    claim("d-waiting")
    store.retry_delivery_later("d-waiting", "HTTP 502", timedelta(hours=1), "w")
    inbox = _samples(client.get("/metrics").get_data(as_text=True))
    assert inbox[("trimo_inbox_deliveries", (("state", "failed"),))] == 1
    assert inbox[("trimo_inbox_deliveries", (("state", "retrying"),))] == 1
    assert inbox[("trimo_inbox_deliveries_retried", ())] == 1

    # Scraped again: the phases seen once are not counted twice.
    again = _samples(client.get("/metrics").get_data(as_text=True))
    assert again[("trimo_phase_duration_seconds_count", (("phase", "agent"),))] == 1


def test_metrics_are_for_this_machine_or_whoever_has_the_token(
    tmp_path: Path, store: Store
) -> None:
    client = _app(tmp_path, store).test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
    with_token = _app(tmp_path, store, metrics_token="scrape-me").test_client()
    away = {"REMOTE_ADDR": "10.1.2.3"}
    assert with_token.get("/metrics", environ_base=away).status_code == 401
    ok = with_token.get(
        "/metrics", environ_base=away, headers={"Authorization": "Bearer scrape-me"}
    )
    assert ok.status_code == 200 and b"trimo_queue_depth" in ok.data


def test_healthz_wants_a_live_worker_that_reaches_its_engine(tmp_path: Path, store: Store) -> None:
    client = _app(tmp_path, store).test_client()
    none = client.get("/healthz")
    assert none.status_code == 503 and "no worker" in none.get_json()["status"]

    broken = StatusWriter(tmp_path, "host:1:2", lambda: "ConnectionError: no socket")
    broken.write()
    down = client.get("/healthz")
    assert down.status_code == 503 and "Docker engine" in down.get_json()["status"]
    assert down.get_json()["workers"][0]["engine_error"] == "ConnectionError: no socket"

    writer = StatusWriter(tmp_path, "host:1:2", lambda: None, every=0.05).start()
    try:
        assert client.get("/healthz").status_code == 200
    finally:
        writer.stop()
    assert client.get("/healthz").status_code == 503  # a stopped worker removes its status


def test_stale_worker_status_is_not_alive(tmp_path: Path) -> None:
    StatusWriter(tmp_path, "w", lambda: None).write()
    assert read_statuses(tmp_path)
    time.sleep(0.05)
    assert read_statuses(tmp_path, fresh=0.01) == []


def test_json_logs_carry_the_run_and_delivery_ids() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure(logging.INFO, "json")
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        log = logging.getLogger("bot.test")
        with about_delivery("d-123"), about_run(42):
            log.warning("report failed for %s", "octo/hello")
        log.warning("outside")
    finally:
        root.handlers[:], root.level = saved
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "report failed for octo/hello"
    assert (first["run_id"], first["delivery_id"], first["level"]) == (42, "d-123", "warning")
    assert (second["run_id"], second["delivery_id"]) == (None, None)
