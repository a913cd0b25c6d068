"""Drain by migration, the pure half: which worker goes on scale-in, and what each drain needs now.

A drain is recorded on the worker pod itself (annotations `shoal.dev/draining`,
`drain-started`, `drain-reason`), never in the operator's memory: every reconcile reads the
pods and the workers' load (GetLoad) and decides one step for each draining worker —
migrate its requests to the survivors, wait, or delete it (nothing left, or out of time).
`apply.py` and `drain_runner.py` carry the steps out.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.operator.migration_spec import MigrationSpec
from shoal.operator.observe import Worker, observe_pod
from shoal.operator.workers import (
    ANNOTATION_DRAIN_REASON,
    ANNOTATION_DRAIN_STARTED,
    ANNOTATION_DRAINING,
)

SCALE_DOWN = "ScaleDown"
MANUAL = "Manual"


@dataclass(frozen=True)
class RequestLoad:
    request_id: str
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    max_tokens: int = 0


@dataclass(frozen=True)
class Load:
    """A worker's GetLoad reply, as plain data."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    free_blocks: int = 0
    total_blocks: int = 0
    draining: bool = False
    requests: tuple[RequestLoad, ...] = ()

    @property
    def empty(self) -> bool:
        return self.num_running + self.num_waiting == 0

    @property
    def work_left(self) -> tuple[int, int]:
        """(tokens still to generate, tokens of KV to move): smaller means cheaper to drain."""
        if not self.requests:  # a reply without per-request detail: count requests
            return (self.num_running + self.num_waiting, 0)
        to_generate = sum(max(r.max_tokens - r.num_output_tokens, 1) for r in self.requests)
        return (to_generate, sum(r.num_computed_tokens for r in self.requests))


@dataclass(frozen=True)
class DrainMark:
    """Annotate a worker as draining (the gateway stops routing to it at once)."""

    name: str
    reason: str  # ScaleDown | Manual
    started: str  # RFC 3339

    def annotations(self) -> dict[str, str]:
        return {
            ANNOTATION_DRAINING: "true",
            ANNOTATION_DRAIN_STARTED: self.started,
            ANNOTATION_DRAIN_REASON: self.reason,
        }


@dataclass(frozen=True)
class DrainCall:
    """Call Drain on a worker (in the background) with the survivors as targets."""

    name: str
    source: str  # the draining worker's gRPC host:port
    targets: tuple[str, ...]
    timeout_s: float  # what is left of drainTimeoutSeconds
    max_concurrent: int = 0  # spec.migration limits (0: the worker's default)
    max_stages: int = 0


@dataclass(frozen=True)
class DrainEnd:
    """A drain is over: delete the worker. outcome: Drained | TimedOut | NotServing."""

    name: str
    outcome: str
    seconds: float
    message: str


def choose_scale_in(
    workers: Sequence[Worker], n: int, loads: Mapping[str, Load | None]
) -> list[Worker]:
    """The `n` workers to remove: hand-marked draining first, then ones that serve nothing
    (not ready), then the least work left by GetLoad; newest first when load is unknown for
    any ready worker (the rule of reconcile.choose_victims)."""
    if n <= 0:
        return []
    newest_first = sorted(workers, key=lambda w: (w.created, w.name), reverse=True)
    ranked = sorted(
        newest_first,
        key=lambda w: (not w.draining, w.ready, w.unschedulable is None, w.crash_loop is None),
    )
    if all(loads.get(w.name) is not None for w in ranked if w.ready):
        pos = {w.name: i for i, w in enumerate(ranked)}
        ranked.sort(
            key=lambda w: (
                not w.draining,
                w.ready,
                _work(loads.get(w.name)) if w.ready else (0, 0),
                pos[w.name],
            )
        )
    return ranked[:n]


def _work(load: Load | None) -> tuple[int, int]:
    return load.work_left if load is not None else (0, 0)


def seconds_between(start: str, now: str) -> float:
    """Seconds from one RFC 3339 stamp to another; 0 when either cannot be read."""
    try:
        a = datetime.datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max(0.0, (b - a).total_seconds())


def drain_step(
    w: Worker,
    load: Load | None,
    targets: Sequence[str],
    now: str,
    migration: MigrationSpec,
) -> DrainCall | DrainEnd | None:
    """What a draining worker needs now: a Drain call, its deletion, or nothing (wait)."""
    started = w.drain_started or now
    elapsed = seconds_between(started, now)
    if not w.ready or w.grpc_target is None:
        # Not ready: the gateway sends it nothing, so it has nothing worth migrating.
        return DrainEnd(
            w.name, "NotServing", elapsed, f"worker {w.name} is not serving; deleting it"
        )
    if load is not None and load.empty:
        return DrainEnd(
            w.name,
            "Drained",
            elapsed,
            f"worker {w.name} drained in {elapsed:.0f}s (no request left); deleting it",
        )
    left = migration.drain_timeout_seconds - elapsed
    if left <= 0:
        what = (
            "its load is unknown (GetLoad failed)"
            if load is None
            else f"{load.num_running} running and {load.num_waiting} waiting request(s) left"
        )
        return DrainEnd(
            w.name,
            "TimedOut",
            elapsed,
            f"worker {w.name} not drained after {migration.drain_timeout_seconds}s ({what}); "
            "deleting it anyway",
        )
    if targets:
        return DrainCall(
            w.name,
            w.grpc_target,
            tuple(targets),
            left,
            migration.max_concurrent_migrations,
            migration.max_stages,
        )
    return None  # no survivor to take its requests (scale to 0): they finish where they are


@dataclass(frozen=True)
class DrainPlan:
    marks: tuple[DrainMark, ...]
    calls: tuple[DrainCall, ...]
    ends: tuple[DrainEnd, ...]
    leaving: tuple[Worker, ...]  # workers being drained (marked now or before)


def plan_drains(
    draining: Sequence[Worker],
    to_mark: Sequence[tuple[Worker, str]],
    survivors: Sequence[Worker],
    loads: Mapping[str, Load | None],
    now: str,
    migration: MigrationSpec,
) -> DrainPlan:
    """One step for every drain: the ones already running and the ones starting now."""
    targets = [w.grpc_target for w in survivors if w.ready and w.grpc_target]
    marks = tuple(DrainMark(w.name, reason, now) for w, reason in to_mark)
    marked = [_as_marked(w, reason, now) for w, reason in to_mark]
    calls: list[DrainCall] = []
    ends: list[DrainEnd] = []
    for w in [*draining, *marked]:
        step = drain_step(w, loads.get(w.name), targets, now, migration)
        if isinstance(step, DrainCall):
            calls.append(step)
        elif isinstance(step, DrainEnd):
            ends.append(step)
    return DrainPlan(marks, tuple(calls), tuple(ends), (*draining, *marked))


def _as_marked(w: Worker, reason: str, now: str) -> Worker:
    from dataclasses import replace

    return replace(w, draining=True, drain_started=now, drain_reason=reason)


def drain_status(
    prev: Mapping[str, Any] | None, plan: DrainPlan, reasons: Mapping[str, str], now: str
) -> dict[str, Any]:
    """`status.drain`: the drains in progress, and how the last one ended."""
    ending = {e.name for e in plan.ends}
    active = [
        {"name": w.name, "reason": w.drain_reason or MANUAL, "startedAt": w.drain_started or now}
        for w in sorted(plan.leaving, key=lambda w: w.name)
        if w.name not in ending
    ]
    out: dict[str, Any] = {"active": active}
    last = (prev or {}).get("last")
    for e in plan.ends:
        last = {
            "worker": e.name,
            "reason": reasons.get(e.name) or MANUAL,
            "outcome": e.outcome,
            "startedAt": _started(plan.leaving, e.name) or now,
            "finishedAt": now,
            "durationSeconds": int(round(e.seconds)),
        }
    if last:
        out["last"] = last
    return out


def _started(workers: Sequence[Worker], name: str) -> str | None:
    return next((w.drain_started for w in workers if w.name == name), None)


def load_wanted(
    mdep: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], replicas: int, drain_on: bool
) -> list[Worker]:
    """Workers whose load the next reconcile needs: every ready one of the pool while a drain
    runs or a scale-in is due (to pick the victim), none otherwise (no gRPC traffic at rest)."""
    uid = (mdep.get("metadata") or {}).get("uid")
    mine = [observe_pod(p) for p in pods]
    live = [w for w in mine if w.owned_by == uid and not w.deleting and not w.finished]
    draining = [w for w in live if w.drain_started]
    staying = [w for w in live if not w.drain_started]
    busy = bool(draining) or any(w.drain_requested for w in staying)
    if drain_on and len(staying) > replicas:
        busy = True
    return [w for w in live if w.ready and w.grpc_target] if busy else []
