"""Celery tasks: view counts are tallied in Redis by the worker, off the request path."""

import os

import redis
from celery import shared_task
from django.conf import settings


def views_key(slug: str) -> str:
    return f"pages:views:{slug}"


@shared_task
def count_view(slug: str) -> dict:
    """Adds one view to the page's tally and reports the new total and who counted it."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    total = client.incr(views_key(slug))
    return {"slug": slug, "views": total, "worker_pid": os.getpid()}
