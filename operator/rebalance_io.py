"""One rebalancer pass against the world: ask the pool's workers their load, decide (pure,
rebalancer.py), migrate the chosen requests, record the state in `status.migration`.

Runs from a kopf timer per ModelDeployment with `spec.migration.rebalance.enabled`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.operator import metrics, migration_client
from shoal.operator.cluster import Cluster, now
from shoal.operator.drain import Load
from shoal.operator.migration_spec import MigrationSpec
from shoal.operator.observe import Worker, observe_pod
from shoal.operator.rebalancer import Decision, Move, decide
from shoal.operator.spec import SpecError, parse_spec

log = logging.getLogger("shoal.operator")


def enabled(spec: Mapping[str, Any]) -> bool:
    try:
        migration = parse_spec(spec).migration or MigrationSpec()
    except SpecError:
        return False
    return migration.rebalance.enabled


def rebalance(cluster: Cluster, namespace: str, name: str) -> Decision | None:
    """One pass; None when the deployment is gone, invalid, or has rebalancing off."""
    mdep = cluster.get_deployment(namespace, name)
    if mdep is None or (mdep.get("metadata") or {}).get("deletionTimestamp"):
        return None
    try:
        migration = parse_spec(mdep.get("spec") or {}).migration or MigrationSpec()
    except SpecError:
        return None
    if not migration.rebalance.enabled:
        return None
    uid = mdep["metadata"].get("uid")
    workers = [observe_pod(p) for p in cluster.list_pods(namespace, name)]
    # Only workers that take new requests may give or take: never one being drained.
    usable = [
        w
        for w in workers
        if w.owned_by == uid
        and w.ready
        and w.grpc_target
        and not (w.deleting or w.draining or w.drain_started or w.drain_requested)
    ]
    by_name = {w.name: w for w in usable}
    loads = _loads(usable)
    state = (mdep.get("status") or {}).get("migration") or {}
    stamp = now()
    decision = decide(
        loads,
        migration.rebalance,
        migration.max_concurrent_migrations,
        bool(state.get("rebalancing")),
        state.get("lastMigrationAt"),
        stamp,
    )
    new_state: dict[str, Any] = {"rebalancing": decision.rebalancing}
    if decision.moves:
        results = _migrate(by_name, decision.moves, migration.max_stages)
        new_state["lastMigrationAt"] = stamp
        moved = 0
        for move, result in zip(decision.moves, results, strict=True):
            outcome = "succeeded" if result.ok else "failed"
            metrics.MIGRATIONS.labels(namespace, name, "rebalance", outcome).inc()
            moved += result.ok
            last = {
                "request": move.request_id,
                "source": move.source,
                "target": move.target,
                "ok": result.ok,
            }
            if result.reason:  # an empty string reaches the API server as null (422)
                last["reason"] = result.reason
            new_state["lastMigration"] = last
        first = decision.moves[0]
        message = (
            f"moved {moved} of {len(decision.moves)} request(s) from {first.source} to "
            f"{first.target} ({decision.reason})"
        )
        log.info("%s/%s: rebalance: %s", namespace, name, message)
        cluster.post_event(mdep, "Normal", "Rebalanced", message)
    if state.get("rebalancing") != new_state["rebalancing"] or decision.moves:
        cluster.patch_status(namespace, name, {"migration": {**state, **new_state}})
    return decision


def _loads(workers: list[Worker]) -> dict[str, Load]:
    if not workers:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(workers))) as pool:
        got = pool.map(lambda w: migration_client.get_load(w.grpc_target or ""), workers)
        return {w.name: load for w, load in zip(workers, got, strict=True) if load is not None}


def _migrate(
    workers: Mapping[str, Worker], moves: tuple[Move, ...], max_stages: int
) -> list[migration_client.MigrateResult]:
    """The moves at once (decide bounded them by maxConcurrentMigrations)."""

    def one(m: Move) -> migration_client.MigrateResult:
        source, target = workers[m.source].grpc_target, workers[m.target].grpc_target
        return migration_client.migrate(source or "", m.request_id, target or "", max_stages)

    with ThreadPoolExecutor(max_workers=len(moves)) as pool:
        return list(pool.map(one, moves))
