"""The autoscaler's pure parts: spec validation, the policy, the PromQL, the Prometheus answer
parser. No cluster, no Prometheus."""

from __future__ import annotations

import pytest

from shoal.operator.autoscaling_policy import (
    DOWN,
    HOLD,
    UP,
    Observation,
    PoolState,
    decide,
    pressure,
    remember,
)
from shoal.operator.autoscaling_queries import observe, pool_selector, queries, quote
from shoal.operator.autoscaling_spec import (
    AutoscalingError,
    AutoscalingSpec,
    Guards,
    ScaleToZero,
    Slo,
    SloTarget,
    parse_autoscaling,
)
from shoal.operator.prometheus import PrometheusError, parse_vector
from shoal.operator.spec import SpecError, parse_spec
from shoal.operator.workers import spec_hash

SPEC = AutoscalingSpec(
    min_replicas=1,
    max_replicas=6,
    slo=Slo(ttft=SloTarget(0.5, 95), tpot=SloTarget(0.05, 95)),
    headroom=0.2,
    scale_up_stabilization_seconds=0,
    scale_down_stabilization_seconds=60,
    cooldown_seconds=20,
    max_step=2,
)
T = 1000.0


def obs(ttft=0.1, tpot=0.01, rate=5.0, waiting=0.0, kv=0.1, workers=9, **kw) -> Observation:
    return Observation(
        ttft=ttft,
        tpot=tpot,
        waiting=waiting,
        kv_usage=kv,
        request_rate=rate,
        workers_reporting=workers,
        **kw,
    )


def state(current=2, ready=None, last=None, history=(), since=T - 3600) -> PoolState:
    return PoolState(
        current=current,
        ready=current if ready is None else ready,
        last_scale_time=last,
        history=tuple(history),
        history_since=since,
    )


# -- spec ---------------------------------------------------------------------------------


def test_spec_defaults_and_fields():
    s = parse_autoscaling(
        {
            "minReplicas": 2,
            "maxReplicas": 5,
            "slo": {"ttft": {"target": 0.4, "percentile": 99}, "tpot": {"target": 0.05}},
            "scaleDown": {"stabilizationWindowSeconds": 30},
            "guards": {"maxWaitingPerReplica": 4},
        }
    )
    assert s is not None
    assert (s.min_replicas, s.max_replicas) == (2, 5)
    assert s.slo.ttft == SloTarget(0.4, 99.0) and s.slo.ttft.quantile == pytest.approx(0.99)
    assert s.slo.tpot == SloTarget(0.05, 95.0)
    assert s.scale_down_stabilization_seconds == 30 and s.scale_up_stabilization_seconds == 0
    assert s.guards.max_waiting_per_replica == 4 and s.cooldown_seconds == 30


@pytest.mark.parametrize("raw", [None, {}, {"enabled": False, "maxReplicas": 3}])
def test_spec_absent_or_disabled_is_none(raw):
    assert parse_autoscaling(raw) is None


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"slo": {"ttft": {"target": 1}}}, "maxReplicas: is required"),
        ({"minReplicas": 4, "maxReplicas": 2, "slo": {"ttft": {"target": 1}}}, "must not exceed"),
        ({"minReplicas": 0, "maxReplicas": 2, "slo": {"ttft": {"target": 1}}}, "scaleToZero"),
        ({"maxReplicas": 2}, "nothing to scale on"),
        ({"maxReplicas": 2, "slo": {"ttft": {"target": 0}}}, "must be > 0"),
        ({"maxReplicas": 2, "slo": {"ttft": {"target": "1s"}}}, "must be a number"),
        ({"maxReplicas": 2, "slo": {"ttft": {"target": 1, "percentile": 100}}}, "percentile"),
        ({"maxReplicas": 2, "slo": {"tpot": {}}}, "target: is required"),
        ({"maxReplicas": 2, "slo": {"ttft": {"target": 1}}, "maxStep": 0}, "maxStep"),
        ({"maxReplicas": 2, "slo": {"ttft": {"target": 1}}, "headroom": 0.95}, "headroom"),
        ({"maxReplicas": 2, "guards": {"maxKvCacheUsage": 1.5}}, "maxKvCacheUsage"),
    ],
)
def test_spec_errors_name_the_field(raw, needle):
    with pytest.raises(AutoscalingError, match="spec.autoscaling") as e:
        parse_autoscaling(raw)
    assert needle in str(e.value)


def test_spec_error_surfaces_as_spec_error_and_never_rolls_workers():
    base = {"model": {"name": "m", "source": "/models/m"}, "replicas": 2}
    with pytest.raises(SpecError, match="minReplicas"):
        parse_spec({**base, "autoscaling": {"minReplicas": 3, "maxReplicas": 1}})
    auto = {"maxReplicas": 4, "slo": {"ttft": {"target": 0.5}}}
    with_auto = parse_spec({**base, "autoscaling": auto})
    assert with_auto.autoscaling is not None and with_auto.autoscaling.max_replicas == 4
    assert spec_hash(with_auto) == spec_hash(parse_spec(base))


def test_scale_to_zero_allows_min_zero():
    s = parse_autoscaling(
        {"minReplicas": 0, "maxReplicas": 2, "slo": {"ttft": {"target": 1}},
         "scaleToZero": {"enabled": True, "idleSeconds": 60}}
    )  # fmt: skip
    assert s is not None and s.min_replicas == 0 and s.scale_to_zero == ScaleToZero(True, 60.0)


# -- pressure and the policy --------------------------------------------------------------


def test_pressure_is_the_worst_ratio_and_zero_when_idle():
    assert pressure(SPEC, obs(ttft=1.0, tpot=0.01), 2) == pytest.approx(2.0)
    assert pressure(SPEC, obs(ttft=0.1, tpot=0.1), 2) == pytest.approx(2.0)
    idle = obs(ttft=None, tpot=None, rate=0.0)
    assert pressure(SPEC, idle, 2) == 0.0
    assert pressure(SPEC, obs(ttft=None, tpot=None, rate=3.0), 2) is None
    guarded = AutoscalingSpec(max_replicas=4, slo=SPEC.slo, guards=Guards(4.0, 0.9))
    assert pressure(guarded, obs(waiting=24.0), 2) == pytest.approx(3.0)
    assert pressure(guarded, obs(kv=0.99), 2) == pytest.approx(1.1)


def test_latency_unknown_under_traffic_is_no_reason_to_shrink():
    guarded = AutoscalingSpec(max_replicas=4, slo=SPEC.slo, guards=Guards(4.0, None))
    # Requests in flight, none got a first token in the window: the guard alone (0 waiting)
    # must not read as "idle".
    busy = obs(ttft=None, tpot=None, rate=0.0, waiting=0.0, running=8.0)
    assert pressure(guarded, busy, 2) is None
    d = decide(guarded, busy, state(3), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 3, "NoData")
    # ...but a guard over its limit still scales up.
    assert pressure(guarded, obs(ttft=None, tpot=None, waiting=40.0, running=8.0), 2) == 5.0
    # A pool with no traffic at all has zero pressure, guards or not.
    assert pressure(guarded, obs(ttft=None, tpot=None, rate=0.0, running=0.0), 2) == 0.0


def test_scale_up_in_proportion_with_headroom_capped_by_max_step():
    # TTFT 0.6 s vs 0.5 s: pressure 1.2 on 2 workers -> ceil(2 * 1.2 / 0.8) = 3.
    d = decide(SPEC, obs(ttft=0.6), state(2), T)
    assert (d.action, d.desired, d.reason) == (UP, 3, "SLOPressure")
    # pressure 4 -> wants 10, max step 2 -> 4.
    d = decide(SPEC, obs(ttft=2.0), state(2), T)
    assert (d.desired, d.recommendation) == (4, 6)  # recommendation clamped to maxReplicas


def test_scale_up_counts_ready_workers_not_starting_ones():
    # 2 ready, 2 more starting (spec says 4): pressure 1.2 asks for 3 <= 4: wait for them.
    d = decide(SPEC, obs(ttft=0.6), state(4, ready=2), T)
    assert (d.action, d.desired) == (HOLD, 4)


def test_never_above_max():
    d = decide(SPEC, obs(ttft=5.0), state(6), T)
    assert (d.action, d.desired) == (HOLD, 6)


def test_scale_down_only_when_one_fewer_still_meets_the_slo():
    # pressure 0.5 on 3: with 2 it would be 0.75 <= 0.8 -> down to 2.
    d = decide(SPEC, obs(ttft=0.25), state(3), T)
    assert (d.action, d.desired, d.reason) == (DOWN, 2, "SLOHolds")
    # pressure 0.6 on 3: with 2 it would be 0.9 > 0.8 -> hold.
    d = decide(SPEC, obs(ttft=0.3), state(3), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 3, "WithinSLO")


def test_scale_down_one_at_a_time_and_not_below_min():
    d = decide(SPEC, obs(ttft=None, tpot=None, rate=0.0), state(5), T)
    assert (d.action, d.desired) == (DOWN, 4)
    d = decide(SPEC, obs(ttft=None, tpot=None, rate=0.0), state(1), T)
    assert (d.action, d.desired) == (HOLD, 1)


def test_scale_down_waits_for_a_full_stabilization_window():
    idle = obs(ttft=None, tpot=None, rate=0.0)
    d = decide(SPEC, idle, state(3, since=T - 10), T)
    assert (d.action, d.reason) == (HOLD, "Stabilizing")
    # A recommendation of 3 within the last 60 s blocks the scale-down.
    d = decide(SPEC, idle, state(3, history=[(T - 30, 3), (T - 10, 2)]), T)
    assert (d.action, d.reason) == (HOLD, "Stabilizing")
    # Older than the window: forgotten.
    d = decide(SPEC, idle, state(3, history=[(T - 90, 3), (T - 10, 2)]), T)
    assert (d.action, d.desired) == (DOWN, 2)


def test_scale_up_stabilization_takes_the_lowest_recommendation():
    spec = AutoscalingSpec(**{**SPEC.__dict__, "scale_up_stabilization_seconds": 30})
    d = decide(spec, obs(ttft=1.0), state(2, history=[(T - 20, 2)]), T)
    assert (d.action, d.reason) == (HOLD, "Stabilizing")
    d = decide(spec, obs(ttft=1.0), state(2, history=[(T - 20, 3)]), T)
    assert (d.action, d.desired) == (UP, 3)


def test_cooldown_holds_any_change():
    d = decide(SPEC, obs(ttft=2.0), state(2, last=T - 5), T)
    assert (d.action, d.reason, d.desired) == (HOLD, "Cooldown", 2)
    d = decide(SPEC, obs(ttft=2.0), state(2, last=T - 25), T)
    assert d.action == UP


def test_no_flapping_after_a_scale_down():
    # After each scale-down the projected pressure was <= 1 - headroom, so the same load on
    # the smaller pool is never read as a reason to scale up again.
    load = 0.4  # pressure on 4 workers
    n, t, history = 4, T, ()
    for _ in range(40):
        p_now = load * 4 / n
        st = PoolState(current=n, ready=n, history=history, history_since=T - 3600)
        d = decide(SPEC, obs(ttft=0.5 * p_now, tpot=0.001), st, t)
        assert d.action != UP
        history = remember(history, t, d.recommendation, 60)
        n, t = d.desired, t + 10
    assert n == 2  # 0.4 * 4 / 2 = 0.8: a third scale-down would break the headroom


def test_prometheus_unreachable_or_no_data_holds_never_minimum():
    d = decide(SPEC, None, state(4), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 4, "MetricsUnavailable")
    d = decide(SPEC, obs(ttft=None, tpot=None, rate=None, waiting=None, workers=0), state(4), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 4, "NoData")
    d = decide(SPEC, obs(ttft=None, tpot=None, rate=2.0), state(4), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 4, "NoData")


def test_no_scale_down_while_some_ready_workers_do_not_report():
    idle_looking = obs(ttft=None, tpot=None, rate=0.0, workers=1)
    d = decide(SPEC, idle_looking, state(3), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 3, "PartialMetrics")
    # Scaling up on what the reporting workers show is still allowed.
    assert decide(SPEC, obs(ttft=2.0, workers=1), state(2), T).action == UP


def test_no_decision_while_draining_or_before_the_window_forgets_the_drain():
    # A drain's migrations stall requests: the spike must not read as a reason to grow.
    spiky = obs(ttft=0.1, tpot=3.0)
    d = decide(SPEC, spiky, PoolState(3, 3, draining=1, history_since=T - 3600), T)
    assert (d.action, d.desired, d.reason) == (HOLD, 3, "Draining")
    just_ended = PoolState(3, 3, history_since=T - 3600, last_drain_end=T - 30)
    d = decide(SPEC, spiky, just_ended, T)  # window 60 s
    assert (d.action, d.reason) == (HOLD, "Settling")
    long_ago = PoolState(3, 3, history_since=T - 3600, last_drain_end=T - 90)
    assert decide(SPEC, spiky, long_ago, T).action == UP


def test_out_of_range_is_clamped_even_without_metrics():
    d = decide(SPEC, None, state(9), T)
    assert (d.action, d.desired, d.reason) == (DOWN, 6, "OutOfRange")
    d = decide(SPEC, None, state(0), T)
    assert (d.action, d.desired) == (UP, 1)


def test_scale_to_zero_and_wake_up():
    spec = AutoscalingSpec(
        min_replicas=0,
        max_replicas=3,
        slo=SPEC.slo,
        scale_down_stabilization_seconds=0,
        cooldown_seconds=0,
        scale_to_zero=ScaleToZero(True, 60),
    )
    idle = obs(ttft=None, tpot=None, rate=0.0, requests_idle_window=0.0)
    d = decide(spec, idle, state(1), T)
    assert (d.action, d.desired, d.reason) == (DOWN, 0, "Idle")
    busyish = obs(ttft=None, tpot=None, rate=0.0, requests_idle_window=3.0)
    assert decide(spec, busyish, state(1), T).action == HOLD
    asleep = Observation(demand_at_zero=0.0)
    assert decide(spec, asleep, state(0), T).desired == 0
    d = decide(spec, Observation(demand_at_zero=2.0), state(0), T)
    assert (d.action, d.desired, d.reason) == (UP, 1, "WakeUp")


def test_remember_drops_what_no_window_needs():
    h = remember([(T - 100, 3), (T - 30, 2)], T, 1, 60)
    assert h == ((T - 30, 2), (T, 1))


# -- PromQL and the Prometheus answer -------------------------------------------------------


def test_queries_select_the_pool_and_use_the_slo_percentile():
    q = queries(SPEC, "ns", "pool-a", 'm"odel')
    sel = 'namespace="ns",pool="pool-a"'
    assert pool_selector("ns", "pool-a") == sel
    assert q["ttft"] == (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(shoal_time_to_first_token_seconds_bucket{{{sel}}}[60s])))"
    )
    assert "shoal_inter_token_latency_seconds_bucket" in q["tpot"]
    assert q["waiting"] == f"sum(shoal_num_requests_waiting{{{sel}}})"
    assert "demand_at_zero" not in q  # scale to zero off
    assert quote('m"odel') == '"m\\"odel"'


def test_observe_maps_answers_to_fields():
    q = queries(SPEC, "ns", "p", "m")
    answers = {q["ttft"]: 0.7, q["workers_reporting"]: 2.0, q["request_rate"]: 1.5}
    o = observe(answers.get, q)
    assert (o.ttft, o.tpot, o.workers_reporting, o.request_rate) == (0.7, None, 2, 1.5)


def test_parse_vector_drops_nan_and_rejects_errors():
    body = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"pool": "a"}, "value": [1, "0.25"]},
                {"metric": {"pool": "b"}, "value": [1, "NaN"]},
            ],
        },
    }
    assert [(s.labels, s.value) for s in parse_vector(body)] == [({"pool": "a"}, 0.25)]
    with pytest.raises(PrometheusError, match="parse error"):
        parse_vector({"status": "error", "error": "parse error at char 3"}, "bad(")
