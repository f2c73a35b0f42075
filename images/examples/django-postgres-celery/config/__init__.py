"""The pages project; loading it also loads the Celery app so tasks bind to it."""

from config.celery import app as celery_app

__all__ = ["celery_app"]
