"""The autoscaling policy, pure: (spec, what Prometheus saw, the pool's state, now) -> a Decision.

SLO pressure is the worst ratio of an observed value to its target: TTFT and TPOT at their
percentile over the window, and the optional guards (waiting requests per ready worker, KV
cache usage). Pressure 1.0 means "exactly at the SLO".

- Up: pressure > 1 asks for enough workers to bring it down to (1 - headroom), in proportion
  (like the HPA's ratio rule), counted from the workers that are Ready (workers still
  starting already answer the last decision: asking again would overshoot).
- Down: one worker at a time, and only when the pressure the survivors would carry
  (pressure * n / (n - 1)) still sits below (1 - headroom): the next evaluation then sees no
  reason to scale up again, so the two rules cannot flap.
- Stabilization: the recommendation of every evaluation is remembered; a scale-down takes
  the highest one of its window (every evaluation of the window must agree), a scale-up the
  lowest one of its window. A window not yet observed in full (operator just started) allows
  no scale-down.
- Cooldown after any change; at most `maxStep` workers added per decision.
- While a worker is drained by migration, and for one window after, no decision: the
  migrations stall the requests they move, so the latency of that time says nothing about
  the pool's size (acting on it made scale-in and scale-up take turns).
- No metrics (Prometheus unreachable, or no worker reports): hold, never fall to the minimum;
  fewer workers reporting than are Ready (a saturated worker misses its scrapes): no
  scale-down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.operator.autoscaling_spec import AutoscalingSpec

UP, DOWN, HOLD = "ScaleUp", "ScaleDown", "Hold"


@dataclass(frozen=True)
class Observation:
    """What the PromQL queries found for one pool (None: no sample in the window)."""

    ttft: float | None = None  # seconds at the SLO percentile
    tpot: float | None = None  # seconds at the SLO percentile
    waiting: float | None = None  # requests waiting, summed over the pool
    running: float | None = None  # requests in the running batches, summed over the pool
    kv_usage: float | None = None  # KV cache usage of the fullest worker (0..1)
    request_rate: float | None = None  # requests finished per second over the window
    workers_reporting: int = 0  # workers with series in Prometheus
    requests_idle_window: float | None = None  # requests seen over scaleToZero.idleSeconds
    demand_at_zero: float = 0.0  # requests the gateway saw for the model (pool at zero)


@dataclass(frozen=True)
class PoolState:
    current: int  # spec.replicas
    ready: int  # Ready workers
    last_scale_time: float | None = None  # when the autoscaler last changed replicas
    # (time, recommendation) of earlier evaluations, oldest first.
    history: tuple[tuple[float, int], ...] = ()
    # Since when this operator has been recording history for the pool.
    history_since: float | None = None
    draining: int = 0  # workers being drained by migration right now
    last_drain_end: float | None = None  # when the last drain finished


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: int  # what the pressure alone asks for (before windows and cooldown)
    action: str  # ScaleUp | ScaleDown | Hold
    reason: str  # CamelCase, for status, events and the metric label
    message: str
    pressure: float | None = None


def pressure(spec: AutoscalingSpec, obs: Observation, ready: int) -> float | None:
    """The worst observed/target ratio; 0 for an idle pool; None when it cannot be known.

    A latency target without a sample is only harmless when the pool is idle: under traffic
    it means no request got its first token in the window, which is no reason to shrink.
    Then only a guard above its limit (a reason to grow) gives a pressure.
    """
    latency: list[float] = []
    missing = False
    for target, value in ((spec.slo.ttft, obs.ttft), (spec.slo.tpot, obs.tpot)):
        if target is not None:
            if value is None:
                missing = True
            else:
                latency.append(value / target.target)
    guards: list[float] = []
    g = spec.guards
    if g.max_waiting_per_replica is not None and obs.waiting is not None:
        per_worker = obs.waiting / max(ready, 1)
        limit = g.max_waiting_per_replica
        guards.append(per_worker / limit if limit > 0 else (math.inf if per_worker else 0.0))
    if g.max_kv_cache_usage is not None and obs.kv_usage is not None:
        guards.append(obs.kv_usage / g.max_kv_cache_usage if g.max_kv_cache_usage else 0.0)
    ratios = latency + guards
    idle = obs.request_rate == 0 and not obs.waiting and not obs.running
    if not missing or idle:
        if ratios:
            return max(ratios)
        return 0.0 if idle else None
    if guards and max(guards) > 1.0:
        return max(ratios)
    return None


def recommend(spec: AutoscalingSpec, obs: Observation, state: PoolState) -> tuple[int, str, str]:
    """What the pressure asks for right now: (replicas, reason, message)."""
    lo, hi, n = spec.min_replicas, spec.max_replicas, state.current
    p = pressure(spec, obs, state.ready)
    util = 1.0 - spec.headroom
    zero = spec.scale_to_zero
    if (
        zero.enabled
        and obs.requests_idle_window == 0
        and not obs.waiting
        and (p is None or p == 0.0)
    ):
        return 0, "Idle", f"no request for {zero.idle_seconds:.0f} s: scale to zero"
    if p is None:
        return n, "NoData", "traffic but no latency samples yet: hold"
    if p > 1.0:
        basis = state.ready if state.ready > 0 else n
        want = max(basis + 1, math.ceil(basis * p / util))
        if want <= n:  # workers still starting already cover it; never down under pressure
            return n, "WaitingForWorkers", f"SLO pressure {p:.2f}; {n - basis} worker(s) starting"
        return (
            min(max(want, lo), hi),
            "SLOPressure",
            f"SLO pressure {p:.2f} on {basis} ready worker(s): {want} bring it to {util:.2f}",
        )
    if n > max(lo, 1) and p * n / (n - 1) <= util:
        return (
            n - 1,
            "SLOHolds",
            f"SLO pressure {p:.2f}; with {n - 1} worker(s) it would be "
            f"{p * n / (n - 1):.2f} <= {util:.2f}",
        )
    return n, "WithinSLO", f"SLO pressure {p:.2f}: {n} worker(s) fit"


def decide(
    spec: AutoscalingSpec, obs: Observation | None, state: PoolState, now: float
) -> Decision:
    """The replica count to set now, and why. `obs` None: Prometheus could not be read."""
    lo, hi, n = spec.min_replicas, spec.max_replicas, state.current
    if n > hi or (n < lo and (n > 0 or not spec.scale_to_zero.enabled)):
        want = min(max(n, lo), hi)
        msg = f"{n} replicas is outside [{lo}, {hi}]: set {want}"
        return Decision(want, want, UP if want > n else DOWN, "OutOfRange", msg)
    if obs is None:
        return Decision(n, n, HOLD, "MetricsUnavailable", f"Prometheus unreadable: hold {n}")
    if n == 0:
        if obs.demand_at_zero > 0:
            want = max(lo, 1)
            msg = f"{obs.demand_at_zero:.0f} request(s) for a pool at zero: wake up to {want}"
            return Decision(want, want, UP, "WakeUp", msg, None)
        return Decision(0, 0, HOLD, "ScaledToZero", "no demand: stay at zero")
    if obs.workers_reporting == 0:
        return Decision(n, n, HOLD, "NoData", f"no worker of the pool reports metrics: hold {n}")

    p = pressure(spec, obs, state.ready)
    rec, reason, message = recommend(spec, obs, state)
    if rec == n:
        return Decision(n, rec, HOLD, reason, message, p)

    if state.draining:
        # Migrations stall the requests they move: the latency now says nothing about size.
        msg = f"{message}; {state.draining} worker(s) draining: wait until the pool settles"
        return Decision(n, rec, HOLD, "Draining", msg, p)
    if state.last_drain_end is not None and now - state.last_drain_end < spec.window_seconds:
        left = spec.window_seconds - (now - state.last_drain_end)
        msg = f"{message}; the window still holds the last drain ({left:.0f} s)"
        return Decision(n, rec, HOLD, "Settling", msg, p)
    if rec < n and obs.workers_reporting < state.ready:
        # A saturated worker can miss its scrapes; the pool then looks idler than it is.
        msg = f"only {obs.workers_reporting} of {state.ready} ready workers report: no scale-down"
        return Decision(n, rec, HOLD, "PartialMetrics", msg, p)
    if rec > n:
        recent = _window(state.history, now, spec.scale_up_stabilization_seconds)
        desired = min([rec, *[r for _, r in recent]])
        if desired <= n:
            return Decision(n, rec, HOLD, "Stabilizing", f"{message}; scale-up window", p)
        desired = min(desired, n + spec.max_step)
    else:
        window = spec.scale_down_stabilization_seconds
        since = state.history_since if state.history_since is not None else now
        if now - since < window:
            msg = f"{message}; {window - (now - since):.0f} s of scale-down window left"
            return Decision(n, rec, HOLD, "Stabilizing", msg, p)
        recent = _window(state.history, now, window)
        desired = max([rec, *[r for _, r in recent]])
        if desired >= n:
            return Decision(n, rec, HOLD, "Stabilizing", f"{message}; scale-down window", p)
        desired = n - 1  # one at a time: each victim is drained before it goes

    if state.last_scale_time is not None and now - state.last_scale_time < spec.cooldown_seconds:
        left = spec.cooldown_seconds - (now - state.last_scale_time)
        return Decision(n, rec, HOLD, "Cooldown", f"{message}; cooldown {left:.0f} s left", p)
    action = UP if desired > n else DOWN
    return Decision(desired, rec, action, reason, f"{n} -> {desired}: {message}", p)


def remember(
    history: Sequence[tuple[float, int]], now: float, recommendation: int, keep_seconds: float
) -> tuple[tuple[float, int], ...]:
    """The history with this evaluation added and what no window can need any more dropped."""
    kept = [(t, r) for t, r in history if now - t <= keep_seconds]
    return (*kept, (now, recommendation))


def _window(
    history: Sequence[tuple[float, int]], now: float, seconds: float
) -> list[tuple[float, int]]:
    return [(t, r) for t, r in history if now - t <= seconds]
