"""Drain by migration, the I/O half: ask workers their load, annotate the ones that drain, and
run each Drain call in a background thread so a long drain never holds a reconcile.

What a drain has reached lives on the pod (annotations) and in the workers themselves
(GetLoad), so a restarted operator simply carries on: the threads here are only the calls in
flight, never the state. One thread per draining pod at a time; when its Drain call returns,
the pool is reconciled at once, which deletes the worker once GetLoad shows nothing left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from kubernetes.client.exceptions import ApiException

from shoal.operator import metrics, migration_client
from shoal.operator.cluster import Cluster
from shoal.operator.drain import DrainCall, DrainMark, Load, load_wanted
from shoal.operator.migration_spec import MigrationSpec
from shoal.operator.spec import SpecError, parse_spec

log = logging.getLogger("shoal.operator")

# After a Drain call that left requests behind (e.g. a target was full), wait this long before
# calling again rather than spinning on a worker that cannot take them right now.
RETRY_AFTER_S = 2.0

_running: dict[tuple[str, str], threading.Thread] = {}
_in_flight: set[tuple[str, str]] = set()  # Drain calls not yet returned
_last_end: dict[tuple[str, str], float] = {}
_guard = threading.Lock()


def fetch_loads(
    mdep: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]
) -> dict[str, Load | None]:
    """GetLoad of the workers the next plan needs (none at rest), asked in parallel."""
    try:
        spec = parse_spec(mdep.get("spec") or {})
    except SpecError:
        return {}
    migration = spec.migration or MigrationSpec()
    workers = load_wanted(mdep, pods, spec.replicas, migration.drain_on_scale_in)
    if not workers:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(workers))) as pool:
        loads = pool.map(lambda w: migration_client.get_load(w.grpc_target or ""), workers)
        found = {w.name: load for w, load in zip(workers, loads, strict=True)}
    # While our Drain call to a worker is in flight, its requests may be between the two
    # workers and its load can read empty: unknown (wait) until the call returns, so the pod
    # is never deleted under a migration.
    namespace = (mdep.get("metadata") or {}).get("namespace", "")
    return {n: None if drain_in_flight(namespace, n) else load for n, load in found.items()}


def drain_in_flight(namespace: str, worker: str) -> bool:
    with _guard:
        return (namespace, worker) in _in_flight


def mark(cluster: Cluster, mdep: Mapping[str, Any], m: DrainMark) -> bool:
    """Annotate a worker as draining; False when it is gone."""
    namespace = mdep["metadata"]["namespace"]
    body = {"metadata": {"annotations": m.annotations()}}
    try:
        cluster.core.patch_namespaced_pod(m.name, namespace, body)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    log.info(
        "%s/%s: draining worker %s (%s)", namespace, mdep["metadata"]["name"], m.name, m.reason
    )
    return True


def start(
    cluster: Cluster,
    mdep: Mapping[str, Any],
    call: DrainCall,
    resync: Callable[[], Any],
) -> bool:
    """Run `call` in the background unless a Drain of that worker is already in flight."""
    meta = mdep["metadata"]
    key = (meta["namespace"], call.name)
    with _guard:
        thread = _running.get(key)
        if thread is not None and thread.is_alive():
            return False
        if time.monotonic() - _last_end.get(key, -RETRY_AFTER_S) < RETRY_AFTER_S:
            return False
        thread = threading.Thread(
            target=_run,
            args=(cluster, dict(mdep), call, resync),
            name=f"drain-{call.name}",
            daemon=True,
        )
        _running[key] = thread
        _in_flight.add(key)
    thread.start()
    return True


def _run(
    cluster: Cluster,
    mdep: dict[str, Any],
    call: DrainCall,
    resync: Callable[[], Any],
) -> None:
    meta = mdep["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    where = f"{namespace}/{name}"
    log.info(
        "%s: Drain %s -> %s (timeout %.0fs)",
        where,
        call.name,
        ", ".join(call.targets),
        call.timeout_s,
    )
    t0 = time.monotonic()
    try:
        result = migration_client.drain(
            call.source,
            call.targets,
            timeout_s=call.timeout_s,
            max_concurrent=call.max_concurrent,
            max_stages=call.max_stages,
        )
    except grpc.RpcError as e:
        # The worker went away or does not speak gRPC: the next reconcile decides (GetLoad
        # unknown means wait until drainTimeoutSeconds, a worker that is gone is deleted).
        log.warning("%s: Drain of %s failed: %s %s", where, call.name, e.code().name, e.details())
        cluster.post_event(
            mdep, "Warning", "DrainCallFailed", f"Drain of {call.name}: {e.code().name}"
        )
    except Exception:
        log.exception("%s: Drain of %s failed", where, call.name)
    else:
        seconds = time.monotonic() - t0
        counts = metrics.MIGRATIONS
        counts.labels(namespace, name, "drain", "succeeded").inc(result.migrated)
        counts.labels(namespace, name, "drain", "failed").inc(result.failed)
        message = (
            f"worker {call.name}: migrated {result.migrated} request(s) in {seconds:.1f}s, "
            f"{result.failed} attempt(s) aborted, {result.remaining} left"
        )
        if result.errors:
            message += f" ({'; '.join(result.errors[:3])})"
        log.info("%s: %s", where, message)
        if result.migrated or result.failed or result.remaining:
            level = "Warning" if result.remaining else "Normal"
            cluster.post_event(mdep, level, "MigratedRequests", message)
    finally:
        with _guard:
            _last_end[(namespace, call.name)] = time.monotonic()
            _in_flight.discard((namespace, call.name))
    try:
        resync()  # delete it now if nothing is left, rather than at the next timer
    except Exception as e:
        log.warning("%s: reconcile after draining %s failed: %s", where, call.name, e)
