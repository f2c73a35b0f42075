"""What /metrics shows, in Prometheus' format: runs by state and repository, the queue, phase
durations, GitHub calls and rate limit, egress denials, webhook deliveries (pending, retrying,
failed, retried) and the reports waiting in the outbox. Read from the store and the workers'
status files when scraped, so it is the same whichever process serves it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bot.health import read_statuses
from bot.network import EGRESS_DENIED
from bot.states import FINISHED, RunState
from bot.store import Store
from bot.store.outbox import Outbox

# Seconds: a phase takes from well under a second (queued on a free worker) to hours (agent).
PHASE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
SCAN_ROWS = 5000


class RunMetrics(Collector):
    """A collector over the store; phase durations and denials are read incrementally."""

    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._cursor = 0
        self._open: dict[int, tuple[RunState, datetime]] = {}
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._denials = 0

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily(
            "trimo_runs", "Runs by repository and state", labels=["repo", "state"]
        )
        for (repo, state), count in sorted(self.store.run_counts().items()):
            runs.add_metric([repo, state], count)
        yield runs
        yield GaugeMetricFamily(
            "trimo_queue_depth", "Runs waiting for a worker", value=self.store.queued_count()
        )
        with self._lock:
            self._scan()
            phases = HistogramMetricFamily(
                "trimo_phase_duration_seconds",
                "How long runs spent in each phase",
                labels=["phase"],
            )
            for phase, counts in sorted(self._buckets.items()):
                cumulative = []
                running = 0
                for bound, n in zip((*PHASE_BUCKETS, float("inf")), counts, strict=True):
                    running += n
                    cumulative.append((_bound(bound), running))
                phases.add_metric([phase], cumulative, self._sums[phase])
            yield phases
            yield CounterMetricFamily(
                "trimo_egress_denials",
                "Connections from run containers that the network policy refused",
                value=self._denials,
            )
        deliveries = GaugeMetricFamily(
            "trimo_inbox_deliveries",
            "Stored webhook deliveries by state (retrying ones are pending too)",
            labels=["state"],
        )
        for state, count in self.store.delivery_counts().items():
            deliveries.add_metric([state.value], count)
        yield deliveries
        yield GaugeMetricFamily(
            "trimo_inbox_deliveries_retried",
            "Stored deliveries processed in the end after more than one attempt",
            value=self.store.retried_deliveries(),
        )
        reports = GaugeMetricFamily(
            "trimo_outbox_reports",
            "Reports to GitHub in the outbox by state (retrying: pending after a failed attempt)",
            labels=["state"],
        )
        for state, count in sorted(Outbox(self.store).counts().items()):
            reports.add_metric([state], count)
        yield reports
        statuses = read_statuses(self.data_dir)
        yield GaugeMetricFamily(
            "trimo_workers_alive", "Workers that reported within 30 s", value=len(statuses)
        )
        calls = CounterMetricFamily(
            "trimo_github_calls", "Calls to GitHub's API", labels=["verb", "outcome"]
        )
        totals: dict[tuple[str, str], int] = {}
        left: list[int] = []
        for status in statuses:
            github = status.get("github") or {}
            for verb, outcome, n in github.get("calls", []):
                totals[(verb, outcome)] = totals.get((verb, outcome), 0) + int(n)
            if github.get("rate_limit_remaining") is not None:
                left.append(int(github["rate_limit_remaining"]))
        for (verb, outcome), n in sorted(totals.items()):
            calls.add_metric([verb, outcome], n)
        yield calls
        if left:
            yield GaugeMetricFamily(
                "trimo_github_rate_limit_remaining",
                "Requests GitHub said were left in the current window (lowest of the workers)",
                value=min(left),
            )

    def _scan(self) -> None:
        while rows := self.store.events_since(self._cursor, ["state", EGRESS_DENIED], SCAN_ROWS):
            for row in rows:
                self._cursor = row.id
                if row.kind == EGRESS_DENIED:
                    self._denials += 1
                    continue
                try:
                    state = RunState(row.message)
                except ValueError:
                    continue
                previous = self._open.pop(row.run_id, None)
                if previous is not None:
                    self._observe(previous[0], (row.created_at - previous[1]).total_seconds())
                if state not in FINISHED:
                    self._open[row.run_id] = (state, row.created_at)
            if len(rows) < SCAN_ROWS:
                return

    def _observe(self, phase: RunState, seconds: float) -> None:
        counts = self._buckets.setdefault(phase.value, [0] * (len(PHASE_BUCKETS) + 1))
        index = next((i for i, b in enumerate(PHASE_BUCKETS) if seconds <= b), len(PHASE_BUCKETS))
        counts[index] += 1
        self._sums[phase.value] = self._sums.get(phase.value, 0.0) + max(seconds, 0.0)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(bound)
