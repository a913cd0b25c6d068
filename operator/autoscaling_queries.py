"""The PromQL the autoscaler runs for one pool (pure: strings out), and the Observation
built from the answers.

Worker series carry `model` and `pool` (the ModelDeployment's name) from the runtime and
`namespace` from the scrape; the pool's percentile is the quantile of the summed bucket
rates of every worker, so one slow worker weighs as much as its share of the traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shoal.operator.autoscaling_policy import Observation
from shoal.operator.autoscaling_spec import AutoscalingSpec


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pool_selector(namespace: str, name: str) -> str:
    return f"namespace={quote(namespace)},pool={quote(name)}"


def queries(spec: AutoscalingSpec, namespace: str, name: str, served_model: str) -> dict[str, str]:
    """Observation field -> PromQL (an instant query aggregating to one sample)."""
    sel = pool_selector(namespace, name)
    w = f"{spec.window_seconds:.0f}s"
    q: dict[str, str] = {
        "workers_reporting": f"count(shoal_num_requests_waiting{{{sel}}})",
        "waiting": f"sum(shoal_num_requests_waiting{{{sel}}})",
        "running": f"sum(shoal_num_requests_running{{{sel}}})",
        "kv_usage": f"max(shoal_kv_cache_usage_ratio{{{sel}}})",
        "request_rate": f"sum(rate(shoal_e2e_request_latency_seconds_count{{{sel}}}[{w}]))",
    }
    if spec.slo.ttft is not None:
        q["ttft"] = _quantile("shoal_time_to_first_token_seconds", spec.slo.ttft.quantile, sel, w)
    if spec.slo.tpot is not None:
        q["tpot"] = _quantile("shoal_inter_token_latency_seconds", spec.slo.tpot.quantile, sel, w)
    if spec.scale_to_zero.enabled:
        idle = f"{spec.scale_to_zero.idle_seconds:.0f}s"
        q["requests_idle_window"] = (
            f"sum(increase(shoal_e2e_request_latency_seconds_count{{{sel}}}[{idle}]))"
            f" + sum(shoal_num_requests_running{{{sel}}})"
        )
        q["demand_at_zero"] = (
            f"sum(increase(shoal_gateway_requests_total{{model={quote(served_model)}}}[{w}]))"
        )
    return q


def _quantile(metric: str, q: float, sel: str, window: str) -> str:
    return f"histogram_quantile({q:g}, sum by (le) (rate({metric}_bucket{{{sel}}}[{window}])))"


def observe(run: Callable[[str], float | None], qs: Mapping[str, str]) -> Observation:
    """Run each query (`run` returns its single value or None) into an Observation."""
    values = {field: run(promql) for field, promql in qs.items()}
    return Observation(
        ttft=values.get("ttft"),
        tpot=values.get("tpot"),
        waiting=values.get("waiting"),
        running=values.get("running"),
        kv_usage=values.get("kv_usage"),
        request_rate=values.get("request_rate"),
        workers_reporting=int(values.get("workers_reporting") or 0),
        requests_idle_window=values.get("requests_idle_window"),
        demand_at_zero=values.get("demand_at_zero") or 0.0,
    )
