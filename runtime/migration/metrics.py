"""Migration and drain series on the worker's registry (names fixed by the contract)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Downtime is short by design (a few decode steps); durations span the staged copies.
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MigrationMetrics:
    def __init__(self, registry: CollectorRegistry, model: str, pool: str):
        labels = {"model": model, "pool": pool}
        self._labels = labels
        names = ["model", "pool"]
        self.migrations = Counter(
            "shoal_migrations_total",
            "Migrations of a request off this worker, by outcome and abort reason",
            [*names, "outcome", "reason"],
            registry=registry,
        )
        self.downtime = Histogram(
            "shoal_migration_downtime_seconds",
            "Time a migrated request made no progress (the stop-and-copy stage)",
            names,
            buckets=DOWNTIME_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.duration = Histogram(
            "shoal_migration_duration_seconds",
            "Whole migration, reservation to hand-off",
            names,
            buckets=DURATION_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.bytes = Counter(
            "shoal_migration_bytes_total",
            "KV blocks and request state sent to targets",
            names,
            registry=registry,
        ).labels(**labels)
        self.draining = Gauge(
            "shoal_worker_draining",
            "1 while this worker drains (admits no new requests)",
            names,
            registry=registry,
        ).labels(**labels)
        self.drain_duration = Histogram(
            "shoal_drain_duration_seconds",
            "How long a Drain call took",
            names,
            buckets=DURATION_BUCKETS,
            registry=registry,
        ).labels(**labels)

    def record(self, outcome) -> None:
        """One migration's Outcome (source.Outcome)."""
        self.bytes.inc(outcome.bytes)
        if outcome.ok:
            self.migrations.labels(**self._labels, outcome="succeeded", reason="").inc()
            self.downtime.observe(outcome.downtime_s)
            self.duration.observe(outcome.duration_s)
        else:
            self.migrations.labels(**self._labels, outcome="aborted", reason=outcome.reason).inc()
