"""The run store and queue: pipelines, runs, events, webhook deliveries, installations.

SQLite file by default (WAL), PostgreSQL by URL. `Store` is composed of one part per concern,
each in a module of its own:

- `records`: the SQLAlchemy tables; `models`: the snapshots handed out (`Run`, `Pipeline`, ...)
  and their conversion from records, derived from the two declarations;
- `pipelines`, `runs` (the run queue), `events`, `deliveries` (the webhook delivery inbox),
  `installations` (installations, posted GitHub ids, refusals), `outbox` (every write to
  GitHub, stored before it is sent; `Outbox(store)`);
- `base`: the engine, sessions and migrations every part shares; `sqlite`: the delivery
  writer's group commit, the WAL checkpoint thread and the fork hooks.

The schema is created only by the Alembic migrations in bot/migrations.
"""

from __future__ import annotations

from bot.store.base import MIGRATIONS_DIR, utcnow
from bot.store.deliveries import DELIVERY_KEEP, DELIVERY_LEASE, Deliveries
from bot.store.events import Events
from bot.store.installations import Installations
from bot.store.models import (
    Delivery,
    DeliveryInfo,
    DeliveryState,
    Installation,
    Pipeline,
    Run,
    RunEventRow,
)
from bot.store.outbox import Outbox, Report, ReportState
from bot.store.pipelines import Pipelines
from bot.store.records import Base, UTCDateTime, schema_objects_of
from bot.store.runs import RunQueue
from bot.store.sqlite import _Checkpointer

__all__ = [
    "DELIVERY_KEEP",
    "DELIVERY_LEASE",
    "MIGRATIONS_DIR",
    "Base",
    "Delivery",
    "DeliveryInfo",
    "DeliveryState",
    "Installation",
    "Outbox",
    "Pipeline",
    "Report",
    "ReportState",
    "Run",
    "RunEventRow",
    "Store",
    "UTCDateTime",
    "_Checkpointer",
    "schema_objects_of",
    "utcnow",
]


class Store(Pipelines, RunQueue, Events, Deliveries, Installations):
    """The database behind Trimo; thread-safe (one engine, a short session per call)."""
