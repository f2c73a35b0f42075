"""Tasks enqueued by the tests are run by the Celery worker that preboot started."""

import os
import uuid

import redis
from django.conf import settings

from pages.tasks import count_view, views_key

RESULT_TIMEOUT_SECONDS = 30


def test_worker_counts_views_in_redis() -> None:
    slug = f"task-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        first = count_view.delay(slug).get(timeout=RESULT_TIMEOUT_SECONDS)
        second = count_view.delay(slug).get(timeout=RESULT_TIMEOUT_SECONDS)

        assert (first["views"], second["views"]) == (1, 2)
        assert client.get(views_key(slug)) == b"2"
        # The work happened in the worker's process, not eagerly in this one.
        assert first["worker_pid"] != os.getpid()
    finally:
        client.delete(views_key(slug))
