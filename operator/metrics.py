"""The operator's own Prometheus metrics (`shoal_operator_*`), served by `--metrics`."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
POOL = ["namespace", "deployment"]

RECONCILES = Counter(
    "shoal_operator_reconciles",
    "Reconcile passes, by result (ok, error).",
    ["result"],
    registry=REGISTRY,
)
CREATED = Counter("shoal_operator_workers_created", "Worker pods created.", POOL, registry=REGISTRY)
DELETED = Counter(
    "shoal_operator_workers_deleted",
    "Worker pods deleted, by reason (ScaleDown, Rollout, Stray, Finished, Deleted).",
    [*POOL, "reason"],
    registry=REGISTRY,
)
WORKERS = Gauge(
    "shoal_operator_pool_workers",
    "Workers of a pool as last observed: desired, current (not terminating), ready.",
    [*POOL, "state"],
    registry=REGISTRY,
)

# -- adapters (operator/adapters_sync.py) --
ADAPTER_LOADS = Counter(
    "shoal_operator_adapter_actions",
    "Adapter loads and unloads the operator asked workers for, by result "
    "(loaded, failed, unloaded).",
    [*POOL, "result"],
    registry=REGISTRY,
)
ADAPTER_WORKERS = Gauge(
    "shoal_operator_adapter_workers",
    "Workers holding each declared adapter, as of the last placement pass.",
    [*POOL, "adapter"],
    registry=REGISTRY,
)
_adapters_seen: dict[tuple[str, str], set[str]] = {}

# -- drains and migrations (operator/drain_runner.py, operator/rebalancer.py) --
DRAINS = Counter(
    "shoal_operator_drains",
    "Drains by migration that ended, by outcome (Drained, TimedOut, NotServing).",
    [*POOL, "outcome"],
    registry=REGISTRY,
)
DRAIN_SECONDS = Histogram(
    "shoal_operator_drain_duration_seconds",
    "From marking a worker draining to deleting it.",
    POOL,
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
MIGRATIONS = Counter(
    "shoal_operator_migrations",
    "Requests the operator had moved between workers, by trigger (drain, rebalance) and "
    "outcome (succeeded, failed).",
    [*POOL, "trigger", "outcome"],
    registry=REGISTRY,
)


def observe_adapters(namespace: str, name: str, entries: list[dict]) -> None:
    names = {e["name"] for e in entries}
    for gone in _adapters_seen.get((namespace, name), set()) - names:
        with contextlib.suppress(KeyError):
            ADAPTER_WORKERS.remove(namespace, name, gone)
    _adapters_seen[(namespace, name)] = names
    for e in entries:
        ADAPTER_WORKERS.labels(namespace, name, e["name"]).set(len(e.get("workers") or []))


def observe_pool(namespace: str, name: str, desired: int, status: dict) -> None:
    WORKERS.labels(namespace, name, "desired").set(desired)
    WORKERS.labels(namespace, name, "current").set(status.get("replicas") or 0)
    WORKERS.labels(namespace, name, "ready").set(status.get("readyReplicas") or 0)


def forget_pool(namespace: str, name: str) -> None:
    for state in ("desired", "current", "ready"):
        with contextlib.suppress(KeyError):  # never observed
            WORKERS.remove(namespace, name, state)
    observe_adapters(namespace, name, [])


def serve(address: str) -> None:
    """Serve /metrics on HOST:PORT in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
