"""`spec.migration`: when the operator moves running requests between workers, and its limits.

Parsed into a plain frozen object with the same clear, field-named errors as spec.py. None of
these fields shape a worker pod, so they are kept out of `spec_hash`: changing them never
rolls the pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.operator.spec import SpecError

WHERE = "spec.migration"


@dataclass(frozen=True)
class RebalanceSpec:
    enabled: bool = False
    # Start moving requests when the most and the least loaded worker differ by this much
    # (load = share of KV blocks used or wanted by queued requests; 0.3 = 30% of the cache).
    threshold: float = 0.3
    # Keep moving until the gap is below threshold - hysteresis, so a pool sitting right at
    # the threshold does not flip between moving and not moving.
    hysteresis: float = 0.1
    # After a migration, wait this long before the next decision: the moved request's load
    # shows up on the target only after a scrape, and acting on stale numbers oscillates.
    cooldown_seconds: int = 15


@dataclass(frozen=True)
class MigrationSpec:
    drain_on_scale_in: bool = True
    rebalance: RebalanceSpec = field(default_factory=RebalanceSpec)
    max_concurrent_migrations: int = 4
    max_stages: int = 3
    drain_timeout_seconds: int = 120


def parse_migration(spec: Mapping[str, Any]) -> MigrationSpec:
    """`spec.migration` (absent: the defaults). Raises SpecError naming the field."""
    m = spec.get("migration")
    if m is None:
        return MigrationSpec()
    if not isinstance(m, Mapping):
        raise SpecError(f"{WHERE}: must be an object")
    _known(m, WHERE, ("drainOnScaleIn", "rebalance", "maxConcurrentMigrations", "maxStages",
                      "drainTimeoutSeconds"))  # fmt: skip
    r = m.get("rebalance")
    if r is None:
        r = {}
    if not isinstance(r, Mapping):
        raise SpecError(f"{WHERE}.rebalance: must be an object")
    rw = f"{WHERE}.rebalance"
    _known(r, rw, ("enabled", "threshold", "hysteresis", "cooldownSeconds"))
    d = RebalanceSpec()
    threshold = _number(r, "threshold", rw, d.threshold, low=0.0, high=1.0)
    hysteresis = _number(r, "hysteresis", rw, d.hysteresis, low=0.0, high=1.0)
    if hysteresis > threshold:
        raise SpecError(
            f"{rw}.hysteresis: {hysteresis} must not exceed threshold {threshold} "
            "(rebalancing stops once the gap falls below threshold - hysteresis)"
        )
    rebalance = RebalanceSpec(
        enabled=_flag(r, "enabled", rw, d.enabled),
        threshold=threshold,
        hysteresis=hysteresis,
        cooldown_seconds=_count(r, "cooldownSeconds", rw, d.cooldown_seconds, minimum=0),
    )
    dm = MigrationSpec()
    return MigrationSpec(
        drain_on_scale_in=_flag(m, "drainOnScaleIn", WHERE, dm.drain_on_scale_in),
        rebalance=rebalance,
        max_concurrent_migrations=_count(
            m, "maxConcurrentMigrations", WHERE, dm.max_concurrent_migrations, minimum=1
        ),
        max_stages=_count(m, "maxStages", WHERE, dm.max_stages, minimum=1),
        drain_timeout_seconds=_count(
            m, "drainTimeoutSeconds", WHERE, dm.drain_timeout_seconds, minimum=1
        ),
    )


def _known(d: Mapping[str, Any], where: str, keys: tuple[str, ...]) -> None:
    # The CRD keeps this block open on old API servers; a typo must not pass silently.
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(keys)})")


def _flag(d: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}.{key}: must be true or false")
    return value


def _count(d: Mapping[str, Any], key: str, where: str, default: int, minimum: int) -> int:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}.{key}: must be an integer")
    if value < minimum:
        raise SpecError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def _number(
    d: Mapping[str, Any], key: str, where: str, default: float, low: float, high: float
) -> float:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{where}.{key}: must be a number")
    if not low <= value <= high:
        raise SpecError(f"{where}.{key}: must be between {low} and {high}, got {value}")
    return float(value)
