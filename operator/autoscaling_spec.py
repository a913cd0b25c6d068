"""`spec.autoscaling`: SLO targets and the knobs of the autoscaler, parsed and validated.

The CRD schema rejects wrong types and ranges at the API server; this module checks what a
Kubernetes 1.20 schema cannot relate (minReplicas <= maxReplicas, a scale-to-zero pool may
have minReplicas 0) and gives the policy plain frozen objects with defaults filled in.

While `spec.autoscaling` is present (and not `enabled: false`) the operator owns
`spec.replicas` through the scale subresource; an external HPA or KEDA ScaledObject on the
same subresource would fight it, so the two are mutually exclusive (docs/autoscaling.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

WHERE = "spec.autoscaling"


@dataclass(frozen=True)
class SloTarget:
    """A latency target: the `percentile` of the metric over the window stays <= `target` s."""

    target: float
    percentile: float = 95.0

    @property
    def quantile(self) -> float:
        return self.percentile / 100.0


@dataclass(frozen=True)
class Slo:
    ttft: SloTarget | None = None
    tpot: SloTarget | None = None


@dataclass(frozen=True)
class Guards:
    """Scale up before the latency shows it: a deep queue or a full KV cache."""

    max_waiting_per_replica: float | None = None
    max_kv_cache_usage: float | None = None


@dataclass(frozen=True)
class ScaleToZero:
    enabled: bool = False
    # No request for this long: scale to zero. At zero, a request seen by the gateway wakes
    # the pool up to minReplicas (at least 1).
    idle_seconds: float = 300.0


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 1
    slo: Slo = field(default_factory=Slo)
    # The PromQL range of every rate and histogram_quantile.
    window_seconds: float = 60.0
    # How often the operator evaluates the policy.
    interval_seconds: float = 10.0
    # Aim this fraction below the SLO target after scaling up (room for the next burst).
    headroom: float = 0.2
    # A scale-up is taken only when every recommendation in this window asked for it; a
    # scale-down only when every one did (the highest recommendation of the window wins).
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 120.0
    # No new decision this soon after the last change.
    cooldown_seconds: float = 30.0
    # Largest change of replicas in one decision (scale-down always steps by one worker).
    max_step: int = 2
    guards: Guards = field(default_factory=Guards)
    scale_to_zero: ScaleToZero = field(default_factory=ScaleToZero)


class AutoscalingError(ValueError):
    """Raised with a message naming the field; spec.py turns it into its SpecError."""


def parse_autoscaling(raw: Any) -> AutoscalingSpec | None:
    """The parsed block, or None when autoscaling is absent or `enabled: false`."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        raise AutoscalingError(f"{WHERE}: must be an object")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise AutoscalingError(f"{WHERE}.enabled: must be true or false")
    if not enabled:
        return None
    zero = _parse_zero(_obj(raw, "scaleToZero", WHERE))
    min_replicas = _int(raw, "minReplicas", WHERE, 0, 1)
    max_replicas = _int(raw, "maxReplicas", WHERE, 1, None)
    if max_replicas is None:
        raise AutoscalingError(f"{WHERE}.maxReplicas: is required")
    if min_replicas == 0 and not zero.enabled:
        raise AutoscalingError(
            f"{WHERE}.minReplicas: 0 needs scaleToZero.enabled: true (otherwise a pool with "
            "no worker has no metrics to scale up from)"
        )
    if min_replicas > max_replicas:
        raise AutoscalingError(
            f"{WHERE}: minReplicas ({min_replicas}) must not exceed maxReplicas ({max_replicas})"
        )
    slo_raw = _obj(raw, "slo", WHERE)
    slo = Slo(
        ttft=_parse_target(slo_raw, "ttft"),
        tpot=_parse_target(slo_raw, "tpot"),
    )
    g = _obj(raw, "guards", WHERE)
    guards = Guards(
        max_waiting_per_replica=_num(g, "maxWaitingPerReplica", f"{WHERE}.guards", 0, None),
        max_kv_cache_usage=_num(g, "maxKvCacheUsage", f"{WHERE}.guards", 0, 1),
    )
    if slo.ttft is None and slo.tpot is None and guards == Guards():
        raise AutoscalingError(
            f"{WHERE}.slo: give a ttft or tpot target (or a guard): there is nothing to scale on"
        )
    up = _obj(raw, "scaleUp", WHERE)
    down = _obj(raw, "scaleDown", WHERE)
    d = AutoscalingSpec()
    return AutoscalingSpec(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        slo=slo,
        window_seconds=_num(raw, "windowSeconds", WHERE, 10, 3600, d.window_seconds),
        interval_seconds=_num(raw, "intervalSeconds", WHERE, 1, 600, d.interval_seconds),
        headroom=_num(raw, "headroom", WHERE, 0, 0.9, d.headroom),
        scale_up_stabilization_seconds=_num(
            up, "stabilizationWindowSeconds", f"{WHERE}.scaleUp", 0, 3600, 0.0
        ),
        scale_down_stabilization_seconds=_num(
            down,
            "stabilizationWindowSeconds",
            f"{WHERE}.scaleDown",
            0,
            3600,
            d.scale_down_stabilization_seconds,
        ),
        cooldown_seconds=_num(raw, "cooldownSeconds", WHERE, 0, 3600, d.cooldown_seconds),
        max_step=_int(raw, "maxStep", WHERE, 1, d.max_step),
        guards=guards,
        scale_to_zero=zero,
    )


def _parse_target(slo: Mapping[str, Any], key: str) -> SloTarget | None:
    t = slo.get(key)
    if t is None:
        return None
    where = f"{WHERE}.slo.{key}"
    if not isinstance(t, Mapping):
        raise AutoscalingError(f"{where}: must be an object {{target, percentile}}")
    target = _num(t, "target", where, 0, None)
    if target is None:
        raise AutoscalingError(f"{where}.target: is required (seconds, e.g. 0.5)")
    if target <= 0:
        raise AutoscalingError(f"{where}.target: must be > 0 seconds, got {target}")
    percentile = _num(t, "percentile", where, 1, 99.99, 95.0)
    return SloTarget(target=target, percentile=percentile)


def _parse_zero(z: Mapping[str, Any]) -> ScaleToZero:
    where = f"{WHERE}.scaleToZero"
    enabled = z.get("enabled", False)
    if not isinstance(enabled, bool):
        raise AutoscalingError(f"{where}.enabled: must be true or false")
    idle = _num(z, "idleSeconds", where, 10, 86400, ScaleToZero.idle_seconds)
    return ScaleToZero(enabled=enabled, idle_seconds=idle)


def _obj(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AutoscalingError(f"{where}.{key}: must be an object")
    return value


def _int(d: Mapping[str, Any], key: str, where: str, minimum: int, default: int | None) -> Any:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise AutoscalingError(f"{where}.{key}: must be an integer")
    if value < minimum:
        raise AutoscalingError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def _num(
    d: Mapping[str, Any],
    key: str,
    where: str,
    minimum: float,
    maximum: float | None,
    default: float | None = None,
) -> Any:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AutoscalingError(f"{where}.{key}: must be a number")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise AutoscalingError(f"{where}.{key}: must be >= {minimum}{upper}, got {value}")
    return float(value)
