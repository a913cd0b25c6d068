"""One adapter pass for a pool: read what workers hold, place (pure), load/unload, report.

Runs from its own kopf timer, apart from the pool's reconcile: adapter loads go over HTTP to
the workers and may take seconds, and the pool's create/delete steps must not wait on them.
Only the final status write takes the reconcile lock (briefly), so that neither pass
overwrites the other's conditions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from shoal.operator import apply, metrics
from shoal.operator.adapters_admin import HeldAdapter, WorkerAdmin
from shoal.operator.adapters_placement import Action, WorkerAdapters, defer_unloads, place
from shoal.operator.adapters_status import CONDITION, LoadFailure, adapters_status
from shoal.operator.cluster import Cluster, now
from shoal.operator.conditions import Condition, find, set_condition
from shoal.operator.observe import Worker, observe_pod
from shoal.operator.spec import SpecError, parse_spec

log = logging.getLogger("shoal.operator.adapters")

# A load the worker refused (bad rank, other base, broken files) is asked again only after
# this long: the same files give the same answer, and the failure stays in status meanwhile.
# A changed source is a new question and is asked at once.
RETRY_REFUSED_AFTER_S = 60.0

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


class Refusals:
    """Recent refused loads by (namespace, pool, worker, adapter, path)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, ...], tuple[float, LoadFailure]] = {}
        self._guard = threading.Lock()

    def recent(self, key: tuple[str, ...]) -> LoadFailure | None:
        with self._guard:
            seen = self._seen.get(key)
            if seen is None or self._clock() - seen[0] > RETRY_REFUSED_AFTER_S:
                self._seen.pop(key, None)
                return None
            return seen[1]

    def remember(self, key: tuple[str, ...], failure: LoadFailure) -> None:
        with self._guard:
            now = self._clock()
            # Forget the expired (deleted pools, fixed adapters) so the memory stays small.
            self._seen = {
                k: v for k, v in self._seen.items() if now - v[0] <= RETRY_REFUSED_AFTER_S
            }
            self._seen[key] = (now, failure)


_refusals = Refusals()
# Per pool: since when each declared adapter's copy has been an unload candidate.
_unwanted: dict[tuple[str, str], dict[Action, float]] = {}


@dataclass
class _Live:
    """A worker during the pass: its pod, and what it holds as loads and unloads land."""

    pod: Worker
    held: dict[str, HeldAdapter]
    busy: float | None = None  # requests running and waiting (any model), when known

    def view(self) -> WorkerAdapters:
        running = {a.name: a.running for a in self.held.values()}
        load = self.busy if self.busy is not None else float(sum(running.values()))
        return WorkerAdapters(self.pod.name, frozenset(self.held), running, load)


def sync_adapters(cluster: Cluster, admin: WorkerAdmin, namespace: str, name: str) -> None:
    """One pass for one ModelDeployment; a pass already running for it is not doubled."""
    lock = _lock(namespace, name)
    if not lock.acquire(blocking=False):
        return  # the previous pass is still loading; the next timer tick comes back
    try:
        _sync(cluster, admin, namespace, name)
    finally:
        lock.release()


def _sync(cluster: Cluster, admin: WorkerAdmin, namespace: str, name: str) -> None:
    mdep = cluster.get_deployment(namespace, name)
    if mdep is None or (mdep.get("metadata") or {}).get("deletionTimestamp"):
        return
    try:
        adapters = parse_spec(mdep.get("spec") or {}).adapters
    except SpecError:
        return  # reconcile reports the bad spec; nothing to place
    status = mdep.get("status") or {}
    if not adapters and "adapters" not in status:
        return  # a pool that never had adapters: nothing to do, nothing to report
    uid = mdep["metadata"].get("uid")
    live = _read_workers(admin, cluster.list_pods(namespace, name), uid)
    declared = {a.name: a for a in adapters}
    where = f"{namespace}/{name}"

    # A worker holding a declared name from another source (the spec changed): drop the old
    # copy first, so the placement below loads the new one.
    for w in live:
        stale = [
            h.name
            for h in w.held.values()
            if h.name in declared and not h.running and _moved(h.path, declared[h.name].path)
        ]
        for adapter in stale:
            if admin.unload(w.pod.endpoint, adapter) is None:
                del w.held[adapter]

    plan = place([w.view() for w in live], adapters)
    by_name = {w.pod.name: w for w in live}
    failures: dict[str, LoadFailure] = {}
    for action in plan.loads:
        w, spec = by_name[action.worker], declared[action.adapter]
        key = (namespace, name, w.pod.name, spec.name, spec.path)
        refused = _refusals.recent(key)
        if refused is not None:
            failures[spec.name] = refused
            continue
        error = admin.load(w.pod.endpoint, spec.name, spec.path)
        if error is None:
            w.held[spec.name] = HeldAdapter(spec.name, spec.path)
            metrics.ADAPTER_LOADS.labels(namespace, name, "loaded").inc()
            log.info("%s: loaded adapter %s on %s", where, spec.name, w.pod.name)
            continue
        metrics.ADAPTER_LOADS.labels(namespace, name, "failed").inc()
        log.warning(
            "%s: loading adapter %s on %s failed (%s): %s",
            where,
            spec.name,
            w.pod.name,
            error.code,
            error.message,
        )
        if error.permanent:  # the worker says no; a transient failure stays "Loading"
            failures[spec.name] = LoadFailure(w.pod.name, error.code, error.message)
            _refusals.remember(key, failures[spec.name])
    unloads, _unwanted[(namespace, name)] = defer_unloads(
        plan.unloads, declared, _unwanted.get((namespace, name), {}), time.monotonic()
    )
    for action in unloads:
        w = by_name[action.worker]
        error = admin.unload(w.pod.endpoint, action.adapter)
        if error is None:
            w.held.pop(action.adapter, None)
            metrics.ADAPTER_LOADS.labels(namespace, name, "unloaded").inc()
            log.info("%s: unloaded adapter %s from %s", where, action.adapter, w.pod.name)
        else:
            log.warning(
                "%s: unloading adapter %s from %s failed (%s): %s",
                where,
                action.adapter,
                w.pod.name,
                error.code,
                error.message,
            )

    entries, condition = adapters_status(adapters, [w.view() for w in live], failures)
    metrics.observe_adapters(namespace, name, entries)
    _report(cluster, mdep, entries, condition)


def _moved(held_path: str, declared_path: str) -> bool:
    """Whether a held copy came from elsewhere (the worker may report a resolved path)."""
    if not held_path:
        return False
    return os.path.realpath(held_path) != os.path.realpath(declared_path)


def _read_workers(
    admin: WorkerAdmin, pods: Sequence[Mapping[str, Any]], uid: str | None
) -> list[_Live]:
    """Ready workers of this pool that answer their admin API; the others hold nothing."""
    live = []
    for pod in pods:
        w = observe_pod(pod)
        if w.owned_by != uid or w.deleting or w.draining or not w.ready or not w.endpoint:
            continue
        try:
            held = admin.list(w.endpoint)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.debug("adapters of %s unknown (%s); left out of placement", w.name, e)
            continue
        live.append(_Live(w, {a.name: a for a in held}, admin.busy(w.endpoint)))
    return live


def _report(
    cluster: Cluster,
    mdep: Mapping[str, Any],
    entries: list[dict[str, Any]],
    condition: Condition,
) -> None:
    meta = mdep["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    before = {e.get("name"): e for e in (mdep.get("status") or {}).get("adapters") or []}
    for e in entries:
        if e["state"] == "Failed" and (before.get(e["name"]) or {}).get("state") != "Failed":
            cluster.post_event(
                mdep, "Warning", "AdapterLoadFailed", f"adapter {e['name']}: {e['message']}"
            )
    # Under the reconcile lock, on a fresh read: reconcile writes conditions from what it
    # read, so both writers must see each other's last write.
    with apply._lock(namespace, name):
        fresh = cluster.get_deployment(namespace, name)
        if fresh is None:
            return
        status = fresh.get("status") or {}
        conditions = set_condition(status.get("conditions"), condition, now())
        old = find(status.get("conditions"), CONDITION)
        new = find(conditions, CONDITION)
        if status.get("adapters") == entries and old == new:
            return
        cluster.patch_status(namespace, name, {"adapters": entries, "conditions": conditions})
