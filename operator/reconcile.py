"""Reconcile, the pure core: (a ModelDeployment, the pods observed) -> a Plan.

Level-triggered like a Kubernetes controller: it never remembers, it reads the world each
time and takes one step toward the spec. The plan says which pods to create and delete, the
status to write and the events worth telling; `apply.py` carries it out.

Rolling update: surge one new worker, wait until it is Ready, then delete one old worker
(never fewer Ready workers than `replicas` while old ones still serve).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.operator import conditions as cond
from shoal.operator.conditions import Condition
from shoal.operator.drain import (
    MANUAL,
    SCALE_DOWN,
    DrainCall,
    DrainMark,
    DrainPlan,
    Load,
    choose_scale_in,
    drain_status,
    plan_drains,
)
from shoal.operator.migration_spec import MigrationSpec
from shoal.operator.observe import Worker, observe_pod
from shoal.operator.spec import (
    DeploymentSpec,
    SpecError,
    parse_spec,
    unimplemented_features,
    validate_name,
)
from shoal.operator.workers import selector_string, spec_hash, worker_pod

# Reasons that mean "this spec cannot be served as it is": a Warning event when they appear.
PROBLEM_REASONS = (
    "InvalidSpec",
    "NotImplemented",
    "ModelSourceNotFound",
    "Unschedulable",
    "WorkerCrashLoop",
)


@dataclass(frozen=True)
class Deletion:
    name: str
    reason: str  # Stray | Finished | ScaleDown | Rollout | Manual (a drain asked by hand)
    message: str
    # Set when the worker was drained by migration first: Drained | TimedOut | NotServing.
    drain_outcome: str | None = None
    drain_seconds: float = 0.0


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[Deletion, ...] = ()
    status: dict[str, Any] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    # Drain by migration (drain.py): workers to annotate as draining, Drain calls to make.
    marks: tuple[DrainMark, ...] = ()
    drains: tuple[DrainCall, ...] = ()


@dataclass(frozen=True)
class _Blocked:
    reason: str
    message: str


def reconcile(
    mdep: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: str,
    path_exists: Callable[[str], bool] | None = None,
    loads: Mapping[str, Load | None] | None = None,
) -> Plan:
    """One step toward the spec. `path_exists` checks a model path (None: do not check);
    `loads` holds the workers' GetLoad replies by pod name (None: unknown), for drains."""
    meta = mdep.get("metadata") or {}
    name, namespace, uid = meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", "")
    raw_spec = mdep.get("spec") or {}
    prev_status = mdep.get("status") or {}

    workers = [observe_pod(p) for p in pods]
    # Stray: wears our deployment label but is not ours. Pods another controller owns are left
    # to it (deleting them would start a fight), unless they say shoal made them.
    stray = [
        w
        for w in workers
        if w.owned_by != uid and not w.deleting and (w.owned_by is None or w.managed_by_shoal)
    ]
    mine = [w for w in workers if w.owned_by == uid and not w.deleting]
    finished = [w for w in mine if w.finished]
    live = [w for w in mine if not w.finished]

    deletes = [
        Deletion(w.name, "Stray", f"pod {w.name} is labelled as ours but not owned by us")
        for w in stray
    ]
    deletes += [
        Deletion(w.name, "Finished", f"worker {w.name} ended ({w.phase}); replacing it")
        for w in finished
    ]

    spec, blocked = _check(name, raw_spec, path_exists)
    if blocked is not None:
        conditions = [
            Condition("Ready", False, blocked.reason, blocked.message),
            Condition("Progressing", False, blocked.reason, "the spec cannot be served as it is"),
            Condition("Degraded", True, blocked.reason, blocked.message),
        ]
        status = _status(mdep, live, "Failed", conditions, now, None, 0)
        return Plan(delete=tuple(deletes), status=status, events=_events(prev_status, status))

    assert spec is not None  # _check gives a spec whenever nothing blocks
    step = _step(spec, live, loads or {}, now)
    deletes += step.deletes
    create = tuple(worker_pod(name, namespace, uid, spec) for _ in range(step.create))
    phase, conditions = _judge(spec, live, step)
    conditions = _with_drains(conditions, step.drains)
    status = _status(mdep, live, phase, conditions, now, step.hash, len(step.current))
    reasons = {w.name: w.drain_reason or "" for w in step.drains.leaving}
    status["drain"] = drain_status(prev_status.get("drain"), step.drains, reasons, now)
    return Plan(
        create=create,
        delete=tuple(deletes),
        status=status,
        events=_events(prev_status, status) + _drain_events(step.drains),
        marks=step.drains.marks,
        drains=step.drains.calls,
    )


def _check(
    name: str, raw_spec: Mapping[str, Any], path_exists: Callable[[str], bool] | None
) -> tuple[DeploymentSpec | None, _Blocked | None]:
    try:
        validate_name(name)
        spec = parse_spec(raw_spec)
    except SpecError as e:
        return None, _Blocked("InvalidSpec", str(e))
    missing = unimplemented_features(raw_spec)
    if missing:
        fields = ", ".join(f"spec.{f}" for f in missing)
        return spec, _Blocked(
            "NotImplemented",
            f"{fields}: not implemented yet (a later Shoal release adds it); "
            "remove it to deploy this model",
        )
    if path_exists is not None and not path_exists(spec.model.path):
        return spec, _Blocked(
            "ModelSourceNotFound",
            f"spec.model.source: {spec.model.path} is not a directory on the operator's host; "
            "put the checkpoint there or fix the path",
        )
    return spec, None


@dataclass(frozen=True)
class _Step:
    hash: str
    current: tuple[Worker, ...]  # live workers of the current spec that stay
    old: tuple[Worker, ...]  # live workers of an older spec (all of them, before deletes)
    create: int
    deletes: tuple[Deletion, ...]
    drains: DrainPlan = DrainPlan((), (), (), ())


def _step(
    spec: DeploymentSpec, live: Sequence[Worker], loads: Mapping[str, Load | None], now: str
) -> _Step:
    want = spec.replicas
    h = spec_hash(spec)
    migration = spec.migration or MigrationSpec()
    # Workers the operator is draining are on their way out whatever their spec: they neither
    # count toward replicas nor take part in a rollout.
    draining = [w for w in live if w.drain_started]
    live = [w for w in live if not w.drain_started]
    current = [w for w in live if w.spec_hash == h]
    old = [w for w in live if w.spec_hash != h]
    deletes: list[Deletion] = []
    # Drains asked by hand (shoal.dev/drain=true) are replaced like lost workers.
    asked = [w for w in current if w.drain_requested]
    current = [w for w in current if not w.drain_requested]

    to_mark: list[tuple[Worker, str]] = []
    if migration.drain_on_scale_in:
        extra = choose_scale_in(current, len(current) - want, loads)
        # Only a ready worker can hold requests; the others go at once.
        to_mark += [(w, SCALE_DOWN) for w in extra if w.ready and w.grpc_target]
        gone = [w for w in extra if not (w.ready and w.grpc_target)]
    else:
        extra = gone = choose_victims(current, len(current) - want)
    deletes += [
        Deletion(w.name, "ScaleDown", f"scaling down to {want}: deleting {w.name}") for w in gone
    ]
    kept = [w for w in current if w not in extra]
    # A hand drain of a serving worker starts once another worker can take its requests
    # (its replacement, in a pool of one); until then it keeps serving.
    if any(w.ready for w in kept):
        to_mark += [(w, MANUAL) for w in asked]
    else:
        to_mark += [(w, MANUAL) for w in asked if not w.ready]
    drains = plan_drains(draining, to_mark, kept, loads, now, migration)
    reasons = {w.name: w.drain_reason or MANUAL for w in drains.leaving}
    deletes += [
        Deletion(e.name, reasons[e.name], e.message, e.outcome, e.seconds) for e in drains.ends
    ]

    # Old workers that serve nothing go at once; Ready ones only while enough stay Ready.
    old_idle = [w for w in old if not w.ready]
    old_ready = choose_victims([w for w in old if w.ready], len(old))
    available = sum(w.ready for w in kept) + len(old_ready)
    n_ready_to_go = min(len(old_ready), max(0, available - want))
    old_gone = old_idle + old_ready[:n_ready_to_go]
    deletes += [
        Deletion(w.name, "Rollout", f"replacing {w.name}: its spec is out of date")
        for w in old_gone
    ]

    old_left = len(old) - len(old_gone)
    missing = max(0, want - len(kept))
    if old_left:  # surge of one while old workers remain
        missing = min(missing, max(0, want + 1 - len(kept) - old_left))
    return _Step(h, tuple(kept), tuple(old), missing, tuple(deletes), drains)


def choose_victims(workers: Sequence[Worker], n: int) -> list[Worker]:
    """The `n` workers to remove first: draining, then not ready, then the newest."""
    if n <= 0:
        return []
    newest_first = sorted(workers, key=lambda w: (w.created, w.name), reverse=True)
    ranked = sorted(
        newest_first,
        key=lambda w: (not w.draining, w.ready, w.unschedulable is None, w.crash_loop is None),
    )
    return ranked[:n]


def _judge(spec: DeploymentSpec, live: Sequence[Worker], step: _Step) -> tuple[str, list]:
    """Phase and conditions from what is observed now."""
    want = spec.replicas
    ready = sum(w.ready for w in live)
    ready_current = sum(w.ready for w in step.current)
    acting = bool(step.create or step.deletes)
    rolling = bool(step.old)

    if rolling:
        progress = (
            "RollingUpdate",
            f"rolling to spec {step.hash}: {len(step.current)}/{want} workers updated",
        )
    elif step.create:
        progress = ("ScalingUp", f"creating {step.create} worker(s) toward {want}")
    elif step.deletes:
        progress = ("ScalingDown", f"removing {len(step.deletes)} worker(s) down to {want}")
    else:
        progress = ("WaitingForWorkers", f"{ready_current}/{want} workers ready")

    unsched = [w for w in step.current if w.unschedulable]
    crash = [w for w in step.current if w.crash_loop]
    if unsched or crash:
        reason = "Unschedulable" if unsched else "WorkerCrashLoop"
        bad = unsched or crash
        first = bad[0]
        message = f"worker {first.name}: {first.unschedulable or first.crash_loop}"
        if len(bad) > 1:
            message += f" (and {len(bad) - 1} more)"
        phase = "Failed" if ready == 0 and want > 0 else "Degraded"
        return phase, [
            Condition("Ready", False, reason, message),
            Condition("Progressing", acting, progress[0] if acting else reason, progress[1]),
            Condition("Degraded", True, reason, message),
        ]

    done = not acting and not rolling and len(step.current) == want and ready_current == want
    if done:
        message = f"{ready_current}/{want} workers ready"
        return "Ready", [
            Condition("Ready", True, "AllWorkersReady", message),
            Condition("Progressing", False, "Complete", message),
            Condition("Degraded", False, "Healthy", message),
        ]
    phase = "Pending" if ready == 0 and not rolling else "Progressing"
    not_ready = (
        ("RollingUpdate", progress[1])
        if rolling
        else ("WorkersNotReady", f"{ready_current}/{want} workers ready")
    )
    return phase, [
        Condition("Ready", False, *not_ready),
        Condition("Progressing", True, *progress),
        Condition("Degraded", False, "Healthy", "no worker reports a problem"),
    ]


def _status(
    mdep: Mapping[str, Any],
    live: Sequence[Worker],
    phase: str,
    conditions: Sequence[Condition],
    now: str,
    hash_: str | None,
    updated: int,
) -> dict[str, Any]:
    meta = mdep.get("metadata") or {}
    prev = (mdep.get("status") or {}).get("conditions")
    workers = []
    for w in sorted(live, key=lambda w: w.name):
        entry: dict[str, Any] = {"name": w.name, "ready": w.ready, "phase": w.phase}
        entry["draining"] = bool(w.drain_started)
        if w.ip:
            entry.update(ip=w.ip, endpoint=w.endpoint)
        workers.append(entry)
    status: dict[str, Any] = {
        "observedGeneration": meta.get("generation"),
        "replicas": len(live),
        "readyReplicas": sum(w.ready for w in live),
        "updatedReplicas": updated,
        "selector": selector_string(meta.get("name", "")),
        "phase": phase,
        "conditions": cond.merge_conditions(prev, conditions, now),
        "workers": workers,
    }
    if hash_ is not None:
        status["specHash"] = hash_
    return status


def _events(prev_status: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[Event, ...]:
    """Tell people when the pool's health changes (not on every reconcile)."""
    before = cond.find(prev_status.get("conditions"), "Ready")
    after = cond.find(status.get("conditions"), "Ready")
    if (before.get("reason"), before.get("message")) == (after.get("reason"), after.get("message")):
        return ()
    if after.get("reason") in PROBLEM_REASONS:
        # Same problem, new message (e.g. another worker): worth one more event only if the
        # reason changed, so a crash loop does not flood the event stream.
        if before.get("reason") == after.get("reason"):
            return ()
        return (Event("Warning", after["reason"], after.get("message", "")),)
    if after.get("status") == "True" and before.get("status") != "True":
        return (Event("Normal", "Ready", after.get("message", "")),)
    return ()


def _with_drains(conditions: list, drains: DrainPlan) -> list:
    """While workers drain, Progressing says so (Ready stays what the kept workers make it)."""
    active = [w.name for w in drains.leaving if w.name not in {e.name for e in drains.ends}]
    if not active:
        return conditions
    message = f"draining {', '.join(sorted(active))} by migration"
    return [
        Condition("Progressing", True, "Draining", message) if c.type == "Progressing" else c
        for c in conditions
    ]


def _drain_events(drains: DrainPlan) -> tuple[Event, ...]:
    """One event when a drain starts and a Warning when one runs out of time."""
    events = [
        Event(
            "Normal",
            "DrainStarted",
            f"draining worker {m.name} ({m.reason}): no new requests; migrating its requests "
            "to the other workers",
        )
        for m in drains.marks
    ]
    events += [
        Event("Warning", "DrainTimedOut", e.message) for e in drains.ends if e.outcome == "TimedOut"
    ]
    return tuple(events)
