"""The JSON API, end to end: Postgres for pages, the Celery worker for view counts."""

import json
import time

import pytest
import redis
from django.conf import settings
from django.test import Client

from pages.tasks import views_key

pytestmark = pytest.mark.django_db

COUNT_TIMEOUT_SECONDS = 30


def test_created_page_is_shown_by_its_slug(client: Client) -> None:
    created = client.post(
        "/pages/", json.dumps({"title": "About Us", "body": "Hi."}), content_type="application/json"
    )
    shown = client.get("/pages/about-us/")

    assert created.status_code == 201
    assert shown.json() == {"title": "About Us", "slug": "about-us", "body": "Hi."}


def test_page_without_title_is_refused(client: Client) -> None:
    response = client.post("/pages/", json.dumps({"body": "?"}), content_type="application/json")

    assert response.status_code == 400
    assert "title" in response.json()["error"]


def test_showing_a_page_has_the_worker_count_the_view(client: Client) -> None:
    client.post("/pages/", json.dumps({"title": "Counted"}), content_type="application/json")
    redis_client = redis.Redis.from_url(settings.REDIS_URL)
    redis_client.delete(views_key("counted"))
    try:
        client.get("/pages/counted/")

        deadline = time.monotonic() + COUNT_TIMEOUT_SECONDS
        while redis_client.get(views_key("counted")) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert redis_client.get(views_key("counted")) == b"1"
    finally:
        redis_client.delete(views_key("counted"))
