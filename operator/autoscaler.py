"""The autoscaler's I/O edge: read Prometheus, ask the pure policy, act through the scale
subresource, report in `status.autoscaling`, a condition, Events and metrics.

It changes `spec.replicas` exactly as `kubectl scale` does (the scale subresource), so
reconcile creates or drains workers the same way whoever asked. The recommendation history
the stabilization windows need lives in this process; after a restart the scale-down window
starts afresh (the safe direction: no scale-down until a whole window was observed).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from shoal.operator import apply, metrics
from shoal.operator.autoscaling_policy import (
    HOLD,
    Decision,
    Observation,
    PoolState,
    decide,
    remember,
)
from shoal.operator.autoscaling_queries import observe, queries
from shoal.operator.autoscaling_spec import AutoscalingSpec
from shoal.operator.cluster import Cluster, now
from shoal.operator.conditions import Condition, find, set_condition
from shoal.operator.prometheus import Prometheus, PrometheusError
from shoal.operator.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec

log = logging.getLogger("shoal.operator")

CONDITION = "MetricsAvailable"
POOL = metrics.POOL
EVALUATIONS = Counter(
    "shoal_operator_autoscaler_evaluations",
    "Autoscaler evaluations, by result (ok, no_data, metrics_unavailable).",
    [*POOL, "result"],
    registry=metrics.REGISTRY,
)
SCALINGS = Counter(
    "shoal_operator_autoscaler_scalings",
    "Replica changes the autoscaler made, by direction and reason.",
    [*POOL, "direction", "reason"],
    registry=metrics.REGISTRY,
)
DESIRED = Gauge(
    "shoal_operator_autoscaler_desired_replicas",
    "Replicas the autoscaler last decided on.",
    POOL,
    registry=metrics.REGISTRY,
)
PRESSURE = Gauge(
    "shoal_operator_autoscaler_slo_pressure",
    "Worst observed/target ratio of the SLOs and guards (1 = at the SLO).",
    POOL,
    registry=metrics.REGISTRY,
)
OBSERVED = Gauge(
    "shoal_operator_autoscaler_observed_seconds",
    "Latency the autoscaler read at the SLO percentile, by slo (ttft, tpot).",
    [*POOL, "slo"],
    registry=metrics.REGISTRY,
)
TARGET = Gauge(
    "shoal_operator_autoscaler_target_seconds",
    "The SLO target, by slo (ttft, tpot); for dashboards next to the observed value.",
    [*POOL, "slo"],
    registry=metrics.REGISTRY,
)
AVAILABLE = Gauge(
    "shoal_operator_autoscaler_metrics_available",
    "1 when the last evaluation could read the pool's metrics from Prometheus, else 0.",
    POOL,
    registry=metrics.REGISTRY,
)


@dataclass
class _Memory:
    since: float
    history: tuple[tuple[float, int], ...] = ()
    last_eval: float = 0.0


class Autoscaler:
    def __init__(
        self,
        cluster: Cluster,
        prometheus: Prometheus | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.prometheus = prometheus
        self.clock = clock
        self._memory: dict[tuple[str, str], _Memory] = {}
        self._guard = threading.Lock()

    def tick(self, namespace: str, name: str) -> Decision | None:
        """Evaluate one pool if its interval has passed; the decision, or None if skipped."""
        mdep = self.cluster.get_deployment(namespace, name)
        if mdep is None or (mdep.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        try:
            spec = parse_spec(mdep.get("spec") or {})
        except SpecError:
            return None  # reconcile reports the bad spec
        auto = spec.autoscaling
        if auto is None:
            self.forget(namespace, name)
            return None
        t = self.clock()
        with self._guard:
            mem = self._memory.setdefault((namespace, name), _Memory(since=t))
            if t - mem.last_eval < auto.interval_seconds * 0.9:  # timers jitter a little
                return None
            mem.last_eval = t
        return self.evaluate(mdep, auto, spec.model.name, mem, t)

    def evaluate(
        self,
        mdep: Mapping[str, Any],
        auto: AutoscalingSpec,
        served_model: str,
        mem: _Memory,
        t: float,
    ) -> Decision:
        meta, status = mdep["metadata"], mdep.get("status") or {}
        namespace, name = meta["namespace"], meta["name"]
        current = int((mdep.get("spec") or {}).get("replicas", 1))
        mine = status.get("autoscaling") or {}
        drain = status.get("drain") or {}
        state = PoolState(
            current=current,
            ready=int(status.get("readyReplicas") or 0),
            last_scale_time=_parse_time(mine.get("lastScaleTime")),
            history=mem.history,
            history_since=mem.since,
            draining=len(drain.get("active") or []),
            last_drain_end=_parse_time((drain.get("last") or {}).get("finishedAt")),
        )
        obs, error = self._observe(auto, namespace, name, served_model)
        decision = decide(auto, obs, state, t)
        keep = max(auto.scale_up_stabilization_seconds, auto.scale_down_stabilization_seconds)
        if obs is not None and decision.reason not in ("NoData", "OutOfRange"):
            mem.history = remember(mem.history, t, decision.recommendation, keep)

        scaled = decision.desired != current and self._scale(mdep, decision)
        self._report(mdep, auto, obs, error, decision, scaled, current)
        return decision

    def forget(self, namespace: str, name: str) -> None:
        """Drop the pool's history and its gauges (deleted, or no longer autoscaled)."""
        with self._guard:
            known = self._memory.pop((namespace, name), None)
        if known is None:
            return
        for gauge in (DESIRED, PRESSURE, AVAILABLE):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        for gauge in (OBSERVED, TARGET):
            for slo in ("ttft", "tpot"):
                with contextlib.suppress(KeyError):
                    gauge.remove(namespace, name, slo)

    # -- edges ------------------------------------------------------------------------------

    def _observe(
        self, auto: AutoscalingSpec, namespace: str, name: str, served_model: str
    ) -> tuple[Observation | None, str]:
        if self.prometheus is None:
            return None, "no Prometheus configured (--prometheus-url / SHOAL_PROMETHEUS_URL)"
        try:
            return observe(self.prometheus.scalar, queries(auto, namespace, name, served_model)), ""
        except PrometheusError as e:
            return None, str(e)

    def _scale(self, mdep: Mapping[str, Any], decision: Decision) -> bool:
        """Set spec.replicas through the scale subresource, as `kubectl scale` does."""
        meta = mdep["metadata"]
        try:
            self.cluster.custom.patch_namespaced_custom_object_scale(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                {"spec": {"replicas": decision.desired}},
            )
        except ApiException as e:
            log.warning(
                "%s/%s: scaling to %d failed: %s %s",
                meta["namespace"],
                meta["name"],
                decision.desired,
                e.status,
                e.reason,
            )
            return False
        return True

    def _report(
        self,
        mdep: Mapping[str, Any],
        auto: AutoscalingSpec,
        obs: Observation | None,
        error: str,
        decision: Decision,
        scaled: bool,
        current: int,
    ) -> None:
        meta = mdep["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        labels = (namespace, name)
        stamp = now()
        result = "ok" if obs is not None else "metrics_unavailable"
        if obs is not None and decision.reason == "NoData":
            result = "no_data"
        EVALUATIONS.labels(*labels, result).inc()
        AVAILABLE.labels(*labels).set(1 if result == "ok" else 0)
        DESIRED.labels(*labels).set(decision.desired if scaled else current)
        if decision.pressure is not None:
            PRESSURE.labels(*labels).set(decision.pressure)
        for slo, target in (("ttft", auto.slo.ttft), ("tpot", auto.slo.tpot)):
            if target is not None:
                TARGET.labels(*labels, slo).set(target.target)
                value = getattr(obs, slo) if obs is not None else None
                if value is not None:
                    OBSERVED.labels(*labels, slo).set(value)

        prev = (mdep.get("status") or {}).get("autoscaling") or {}
        report: dict[str, Any] = {
            "currentReplicas": current,
            "desiredReplicas": decision.desired if scaled else current,
            "recommendation": decision.recommendation,
            "lastDecision": decision.action if scaled else HOLD,
            "reason": decision.reason,
            "message": decision.message,
            "lastEvaluationTime": stamp,
            "lastScaleTime": stamp if scaled else prev.get("lastScaleTime"),
            "observed": _observed(obs, decision),
        }
        last = prev.get("lastScale")
        if scaled:
            last = {
                "from": current,
                "to": decision.desired,
                "reason": decision.reason,
                "message": decision.message,
                "time": stamp,
            }
        if last:
            report["lastScale"] = last
        if scaled:
            direction = "up" if decision.desired > current else "down"
            SCALINGS.labels(*labels, direction, decision.reason).inc()
            log.info("%s/%s: autoscaler %s", namespace, name, decision.message)
            self.cluster.post_event(
                mdep, "Normal", "ScaledUp" if direction == "up" else "ScaledDown", decision.message
            )
        if result == "ok":
            cond = Condition(CONDITION, True, "MetricsRead", "the pool's metrics were read")
        elif result == "no_data":
            cond = Condition(CONDITION, False, "NoData", decision.message)
        else:
            cond = Condition(CONDITION, False, "PrometheusUnavailable", f"{error}; holding")
        before = find((mdep.get("status") or {}).get("conditions"), CONDITION)
        flipped = before.get("status") != ("True" if cond.status else "False") or (
            before.get("reason") != cond.reason
        )
        if flipped and cond.reason == "PrometheusUnavailable":
            self.cluster.post_event(mdep, "Warning", cond.reason, cond.message)
            log.warning("%s/%s: autoscaler holds: %s", namespace, name, cond.message)
        elif flipped and not cond.status:  # workers still starting, usually: not a warning
            log.info("%s/%s: autoscaler holds: %s", namespace, name, cond.message)
        self._patch_status(namespace, name, report, cond if flipped else None)

    def _patch_status(
        self, namespace: str, name: str, report: dict[str, Any], cond: Condition | None
    ) -> None:
        """A merge patch of `status.autoscaling` only (and the condition when it changed),
        under reconcile's lock so the conditions list is not written from a stale view."""
        patch: dict[str, Any] = {"autoscaling": report}
        try:
            if cond is None:
                self.cluster.patch_status(namespace, name, patch)
                return
            with apply._lock(namespace, name):
                fresh = self.cluster.get_deployment(namespace, name)
                if fresh is None:
                    return
                prev = (fresh.get("status") or {}).get("conditions")
                patch["conditions"] = set_condition(prev, cond, now())
                self.cluster.patch_status(namespace, name, patch)
        except ApiException as e:
            log.warning("%s/%s: writing status.autoscaling failed: %s", namespace, name, e.reason)


def _observed(obs: Observation | None, decision: Decision) -> dict[str, Any]:
    if obs is None:
        return {}
    out: dict[str, Any] = {
        "ttftSeconds": obs.ttft,
        "tpotSeconds": obs.tpot,
        "requestsWaiting": obs.waiting,
        "requestsRunning": obs.running,
        "kvCacheUsage": obs.kv_usage,
        "requestRate": obs.request_rate,
        "workersReporting": obs.workers_reporting,
        "sloPressure": decision.pressure,
    }
    # Numbers as strings: a structural schema cannot hold NaN, and kubectl shows them as is.
    return {k: _fmt(v) for k, v in out.items() if v is not None}


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _parse_time(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return (
            datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=datetime.UTC)
            .timestamp()
        )
    except ValueError:
        return None
