"""Trimo's log lines: plain text or one JSON object per line, each naming the run and the
webhook delivery it belongs to (set here by the code that works on them)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

run_id_var: ContextVar[int | None] = ContextVar("trimo_run_id", default=None)
delivery_id_var: ContextVar[str | None] = ContextVar("trimo_delivery_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"


@contextmanager
def about_run(run_id: int) -> Iterator[None]:
    token = run_id_var.set(run_id)
    try:
        yield
    finally:
        run_id_var.reset(token)


@contextmanager
def about_delivery(delivery_id: str) -> Iterator[None]:
    token = delivery_id_var.set(delivery_id)
    try:
        yield
    finally:
        delivery_id_var.reset(token)


class _Ids(logging.Filter):
    """Puts the current run and delivery ids on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id, delivery_id = run_id_var.get(), delivery_id_var.get()
        ids = []
        if run_id is not None:
            ids.append(f"run={run_id}")
        if delivery_id is not None:
            ids.append(f"delivery={delivery_id}")
        record.__dict__.update(
            run_id=run_id, delivery_id=delivery_id, ids=f" [{' '.join(ids)}]" if ids else ""
        )
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
            "delivery_id": getattr(record, "delivery_id", None),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: int, fmt: str = "text") -> None:
    """Log to stderr at `level`, as text or as JSON lines (`fmt` "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Ids())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
