"""Pages: titled pages stored in Postgres, with view counts tallied by a Celery worker."""
