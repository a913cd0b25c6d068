"""What an observed Pod means to the operator: one plain `Worker` per pod dict.

Pure: reads the API's camelCase pod dicts (as kopf and `sanitize_for_serialization` give them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.operator.workers import (
    ANNOTATION_DRAIN,
    ANNOTATION_DRAIN_REASON,
    ANNOTATION_DRAIN_STARTED,
    ANNOTATION_DRAINING,
    CONTAINER,
    GRPC_PORT,
    LABEL_MANAGED_BY,
    LABEL_SPEC_HASH,
    MANAGER,
    PORT,
)

# A worker that has crashed (restarted at least this often) and is not Ready now counts as
# crash-looping: its spec likely cannot be served, and saying so beats a silent restart loop.
# Once, not more: between crashes the container is briefly "running", and a higher bar would
# make the condition flap with every restart.
CRASH_LOOP_RESTARTS = 1


@dataclass(frozen=True)
class Worker:
    name: str
    spec_hash: str
    phase: str
    ip: str | None
    ready: bool
    created: str  # RFC 3339; sorts chronologically as a string
    owned_by: str | None  # uid of the controlling owner, if any
    managed_by_shoal: bool = False  # carries app.kubernetes.io/managed-by: shoal-operator
    deleting: bool = False
    draining: bool = False
    unschedulable: str | None = None  # the scheduler's message
    crash_loop: str | None = None  # what the last crash said
    drain_requested: bool = False  # a person annotated shoal.dev/drain=true
    drain_started: str | None = None  # RFC 3339: the operator is draining it by migration
    drain_reason: str | None = None  # ScaleDown | Manual

    @property
    def finished(self) -> bool:
        """Failed or Succeeded: with restartPolicy Always this pod will not run again."""
        return self.phase in ("Failed", "Succeeded")

    @property
    def endpoint(self) -> str | None:
        return f"http://{self.ip}:{PORT}" if self.ip else None

    @property
    def grpc_target(self) -> str | None:
        """`host:port` of the worker's gRPC service (migration and control)."""
        return f"{self.ip}:{GRPC_PORT}" if self.ip else None


def observe_pod(pod: Mapping[str, Any]) -> Worker:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "no node can run this worker"
    owner = next(
        (o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None
    )
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return Worker(
        name=meta.get("name", ""),
        spec_hash=labels.get(LABEL_SPEC_HASH, ""),
        phase=status.get("phase") or "Pending",
        ip=status.get("podIP") or None,
        ready=ready,
        created=str(meta.get("creationTimestamp") or ""),
        owned_by=owner,
        managed_by_shoal=labels.get(LABEL_MANAGED_BY) == MANAGER,
        deleting=bool(meta.get("deletionTimestamp")),
        draining=annotations.get(ANNOTATION_DRAINING) == "true",
        unschedulable=unschedulable,
        crash_loop=None if ready else _crash_loop(status),
        drain_requested=annotations.get(ANNOTATION_DRAIN) == "true",
        drain_started=annotations.get(ANNOTATION_DRAIN_STARTED) or None,
        drain_reason=annotations.get(ANNOTATION_DRAIN_REASON) or None,
    )


def _crash_loop(status: Mapping[str, Any]) -> str | None:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        restarts = int(cs.get("restartCount") or 0)
        if waiting.get("reason") == "CrashLoopBackOff" or restarts >= CRASH_LOOP_RESTARTS:
            detail = last.get("message") or last.get("reason") or waiting.get("message") or ""
            code = last.get("exitCode")
            text = f"container restarted {restarts} time{'' if restarts == 1 else 's'}"
            if code is not None:
                text += f", last exit code {code}"
            return f"{text}: {detail}".rstrip(": ") if detail else text
    return None
