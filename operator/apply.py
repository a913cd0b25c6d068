"""One reconcile pass against the API: read the world, plan (pure), carry the plan out.

Every kopf handler (create, update, resume, timer, pod events) ends up here, so the pool
converges whichever event arrives first. A lock per ModelDeployment keeps two handlers of
this process from planning on the same stale view; two operator replicas are kept apart by
kopf peering (see cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubernetes.client.exceptions import ApiException

from shoal.operator import conditions as cond
from shoal.operator import drain_runner, metrics
from shoal.operator.cluster import Cluster, now
from shoal.operator.conditions import Condition, merge_conditions
from shoal.operator.reconcile import Event, Plan, reconcile
from shoal.operator.workers import LABEL_DEPLOYMENT, worker_service

log = logging.getLogger("shoal.operator")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def sync(cluster: Cluster, namespace: str, name: str, check_source: bool = True) -> Plan | None:
    """Reconcile one ModelDeployment now; None when it is gone or being deleted."""
    with _lock(namespace, name):
        mdep = cluster.get_deployment(namespace, name)
        if mdep is None or (mdep.get("metadata") or {}).get("deletionTimestamp"):
            return None
        pods = cluster.list_pods(namespace, name)
        path_exists: Callable[[str], bool] | None = os.path.isdir if check_source else None
        loads = drain_runner.fetch_loads(mdep, pods)  # GetLoad, only while a drain is due
        plan = reconcile(mdep, pods, now(), path_exists, loads=loads)
        try:
            carry_out(
                cluster, mdep, plan, resync=lambda: sync(cluster, namespace, name, check_source)
            )
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
        metrics.RECONCILES.labels("ok").inc()
        desired = (mdep.get("spec") or {}).get("replicas", 1)
        metrics.observe_pool(namespace, name, desired, plan.status)
        return plan


def carry_out(
    cluster: Cluster,
    mdep: Mapping[str, Any],
    plan: Plan,
    resync: Callable[[], Any] | None = None,
) -> None:
    """`resync` reconciles the pool again (a finished background drain calls it)."""
    meta = mdep["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status, events = plan.status, list(plan.events)
    # Draining first: the gateway must stop routing to a worker before its requests move.
    for m in plan.marks:
        drain_runner.mark(cluster, mdep, m)
    # Level-triggered for the Service too: a deleted one comes back while the pool exists.
    wants_service = bool(plan.create or status.get("replicas"))
    if wants_service and cluster.ensure_service(worker_service(name, namespace, meta["uid"])):
        log.info("%s/%s: created Service %s-workers", namespace, name, name)

    for d in plan.delete:
        if cluster.delete_pod(namespace, d.name):
            log.info("%s/%s: deleted worker %s (%s)", namespace, name, d.name, d.reason)
            metrics.DELETED.labels(namespace, name, d.reason).inc()
            cluster.post_event(mdep, "Normal", "DeletedWorker", d.message)
            if d.drain_outcome:
                metrics.DRAINS.labels(namespace, name, d.drain_outcome).inc()
                metrics.DRAIN_SECONDS.labels(namespace, name).observe(d.drain_seconds)

    for call in plan.drains:
        drain_runner.start(cluster, mdep, call, resync or (lambda: None))

    refused = _create_workers(cluster, mdep, plan.create)
    if refused is not None:
        status = failed_create(mdep, status, refused)
        before = cond.find((mdep.get("status") or {}).get("conditions"), "Ready")
        if before.get("reason") != "FailedCreate":  # one Warning, not one per reconcile
            events.append(Event("Warning", "FailedCreate", refused))

    for e in events:
        level = logging.WARNING if e.type == "Warning" else logging.INFO
        log.log(level, "%s/%s: %s: %s", namespace, name, e.reason, e.message)
        cluster.post_event(mdep, e.type, e.reason, e.message)

    if _changed(mdep.get("status") or {}, status):
        cluster.patch_status(namespace, name, status)


def _create_workers(
    cluster: Cluster, mdep: Mapping[str, Any], manifests: Sequence[Mapping[str, Any]]
) -> str | None:
    """Create the planned pods; None, or why the API refuses them (retrying cannot help)."""
    meta = mdep["metadata"]
    for i, manifest in enumerate(manifests):
        try:
            pod = cluster.create_pod(manifest)
        except ApiException as e:
            if e.status is None or e.status >= 500 or e.status in (409, 429):
                raise  # transient: kopf retries the handler, the timer comes back anyway
            return _api_message(e)  # quota, admission, a field the schema let through
        except ValueError as e:  # the client's own model check of the manifest
            return " ".join(str(e).split())
        log.info(
            "%s/%s: created worker %s (%d of %d)",
            meta["namespace"],
            meta["name"],
            pod,
            i + 1,
            len(manifests),
        )
        metrics.CREATED.labels(meta["namespace"], meta["name"]).inc()
        cluster.post_event(mdep, "Normal", "CreatedWorker", f"created worker pod {pod}")
    return None


def failed_create(mdep: Mapping[str, Any], status: Mapping[str, Any], message: str) -> dict:
    """Status for a pool whose worker pods the API server refuses to create."""
    conditions = [
        Condition("Ready", False, "FailedCreate", message),
        Condition("Progressing", False, "FailedCreate", "the API server refuses the worker pod"),
        Condition("Degraded", True, "FailedCreate", message),
    ]
    prev = (mdep.get("status") or {}).get("conditions")
    phase = "Degraded" if status.get("readyReplicas") else "Failed"  # some still serve
    return {**status, "phase": phase, "conditions": merge_conditions(prev, conditions, now())}


def delete_pool(cluster: Cluster, mdep: Mapping[str, Any]) -> int:
    """Delete every worker and the Service of a ModelDeployment; returns pods still present."""
    meta = mdep["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with _lock(namespace, name):
        remaining = 0
        for pod in cluster.list_pods(namespace, name):
            pmeta = pod["metadata"]
            owners = {o.get("uid") for o in pmeta.get("ownerReferences") or []}
            if owners and meta["uid"] not in owners:
                continue  # another object's pod that happens to carry our label
            if (pmeta.get("labels") or {}).get(LABEL_DEPLOYMENT) != name:
                continue
            remaining += 1
            if not pmeta.get("deletionTimestamp") and cluster.delete_pod(namespace, pmeta["name"]):
                log.info(
                    "%s/%s: deleted worker %s (deployment deleted)", namespace, name, pmeta["name"]
                )
                metrics.DELETED.labels(namespace, name, "Deleted").inc()
                cluster.post_event(
                    mdep, "Normal", "DeletedWorker", f"deleted worker {pmeta['name']}"
                )
        cluster.delete_service(namespace, f"{name}-workers")
        metrics.forget_pool(namespace, name)
        return remaining


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{e.status} {e.reason}"
