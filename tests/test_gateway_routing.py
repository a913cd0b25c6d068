"""Pure gateway logic: pools from Kubernetes objects, static specs, routing, load parsing."""

from __future__ import annotations

import pytest

from shoal.runtime.gateway.load import parse_worker_load
from shoal.runtime.gateway.pools import Worker, build_pools, parse_static, routable_worker
from shoal.runtime.gateway.routing import WorkerLoad, pick_worker
from shoal.runtime.gateway.state import FAILURE_PENALTY_S, LOAD_MAX_AGE_S, GatewayState


def pod(
    name: str,
    *,
    mdep: str = "tiny",
    model: str = "tiny",
    namespace: str = "default",
    ip: str | None = "127.0.1.1",
    ready: bool = True,
    phase: str = "Running",
    annotations: dict | None = None,
    deleting: bool = False,
    port: int | None = 8000,
) -> dict:
    meta = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": "shoal-worker",
            "shoal.dev/deployment": mdep,
            "shoal.dev/model": model,
        },
        "annotations": annotations or {},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ports = [{"name": "http", "containerPort": port}] if port else []
    status = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "worker", "ports": ports}]},
        "status": status,
    }


def mdep(name: str, model: str, namespace: str = "default") -> dict:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"name": model, "source": "/models/x"}},
    }


# -- which pods are routable --


def test_ready_pod_with_ip_is_routable_at_its_http_port():
    assert routable_worker(pod("a", ip="127.0.3.4", port=9000)) == Worker(
        "a", "http://127.0.3.4:9000"
    )


def test_port_defaults_to_8000_without_a_named_port():
    assert routable_worker(pod("a", port=None)).endpoint == "http://127.0.1.1:8000"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ready": False},
        {"ip": None},
        {"phase": "Pending"},
        {"deleting": True},
        {"annotations": {"shoal.dev/draining": "true"}},
        {"annotations": {"shoal.dev/draining": "True"}},
    ],
)
def test_unready_missing_ip_terminating_or_draining_pods_are_not_routable(kwargs):
    assert routable_worker(pod("a", **kwargs)) is None


def test_draining_false_is_still_routable():
    assert routable_worker(pod("a", annotations={"shoal.dev/draining": "false"})) is not None


def test_ipv6_pod_ip_is_bracketed():
    assert routable_worker(pod("a", ip="fd00::5")).endpoint == "http://[fd00::5]:8000"


# -- pools --


def test_pools_use_the_served_name_from_the_modeldeployment_not_the_label():
    # Label values cannot hold '/', so the served name comes from the ModelDeployment.
    pools = build_pools(
        [mdep("llama", "meta/llama-tiny")],
        [pod("llama-b", mdep="llama", model="x", ip="127.0.0.2"), pod("llama-a", mdep="llama")],
    )
    assert list(pools) == ["meta/llama-tiny"]
    assert [w.name for w in pools["meta/llama-tiny"].workers] == ["llama-a", "llama-b"]


def test_a_modeldeployment_without_ready_workers_is_an_empty_pool():
    pools = build_pools([mdep("a", "m-a"), mdep("b", "m-b")], [pod("a-1", mdep="a", ready=False)])
    assert pools["m-a"].workers == () and pools["m-b"].workers == ()


def test_pods_match_their_modeldeployment_within_their_namespace():
    pools = build_pools(
        [mdep("x", "in-ns1", namespace="ns1"), mdep("x", "in-ns2", namespace="ns2")],
        [pod("x-1", mdep="x", namespace="ns2")],
    )
    assert pools["in-ns1"].workers == ()
    assert [w.name for w in pools["in-ns2"].workers] == ["x-1"]


def test_pod_without_a_known_modeldeployment_falls_back_to_its_model_label():
    pools = build_pools([], [pod("orphan-1", mdep="gone", model="tiny")])
    assert [w.name for w in pools["tiny"].workers] == ["orphan-1"]


def test_exact_served_name_annotation_beats_the_label_safe_label():
    exact = {"shoal.dev/served-model-name": "org/llama"}
    pools = build_pools([], [pod("orphan-1", mdep="gone", model="org-llama", annotations=exact)])
    assert list(pools) == ["org/llama"]


def test_same_model_in_two_namespaces_is_one_pool():
    pools = build_pools(
        [mdep("a", "shared", "ns1"), mdep("b", "shared", "ns2")],
        [pod("a-1", mdep="a", namespace="ns1"), pod("b-1", mdep="b", namespace="ns2")],
    )
    assert [w.name for w in pools["shared"].workers] == ["a-1", "b-1"]


# -- static specs --


def test_parse_static_repeatable_and_deduplicated():
    pools = parse_static(["a=http://h:1,http://h:2/", "b=http://h:3", "a=http://h:2"])
    assert [w.endpoint for w in pools["a"].workers] == ["http://h:1", "http://h:2"]
    assert [w.endpoint for w in pools["b"].workers] == ["http://h:3"]


@pytest.mark.parametrize("spec", ["a", "=http://h:1", "a=", "a=h:1", "a=ftp://h"])
def test_parse_static_rejects_bad_specs_with_a_message(spec):
    with pytest.raises(ValueError, match="--static"):
        parse_static([spec])


# -- routing --

A, B, C = (Worker(n, f"http://{n}:8000") for n in "abc")


def test_least_inflight_wins():
    assert pick_worker([A, B, C], {A.endpoint: 2, B.endpoint: 0, C.endpoint: 1}, {}) == B


def test_worker_queue_counts_as_load():
    loads = {A.endpoint: WorkerLoad(waiting=3), B.endpoint: WorkerLoad(waiting=0)}
    assert pick_worker([A, B], {A.endpoint: 0, B.endpoint: 1}, loads) == B


def test_kv_usage_breaks_ties_toward_more_room():
    loads = {A.endpoint: WorkerLoad(kv_cache_usage=0.9), B.endpoint: WorkerLoad(kv_cache_usage=0.1)}
    assert pick_worker([A, B], {}, loads) == B


def test_ties_rotate_round_robin():
    picks = [pick_worker([A, B, C], {}, {}, rotation=r) for r in range(6)]
    assert picks == [A, B, C, A, B, C]


def test_excluded_workers_are_skipped_and_none_when_all_tried():
    assert pick_worker([A, B], {}, {}, exclude={A.endpoint}) == B
    assert pick_worker([A, B], {}, {}, exclude={A.endpoint, B.endpoint}) is None
    assert pick_worker([], {}, {}) is None


def test_penalized_workers_only_when_nothing_else_is_left():
    assert pick_worker([A, B], {B.endpoint: 5}, {}, penalized={A.endpoint}) == B
    assert pick_worker([A, B], {}, {}, exclude={B.endpoint}, penalized={A.endpoint}) == A


# -- worker load from /metrics --


def test_parse_worker_load_folds_label_sets():
    text = """\
# HELP shoal_num_requests_waiting Requests waiting.
# TYPE shoal_num_requests_waiting gauge
shoal_num_requests_waiting{model="tiny",pool="p"} 2.0
shoal_num_requests_waiting{model="tiny",pool="q"} 1.0
# TYPE shoal_num_requests_running gauge
shoal_num_requests_running{model="tiny",pool="p"} 4.0
# TYPE shoal_kv_cache_usage_ratio gauge
shoal_kv_cache_usage_ratio{model="tiny",pool="p"} 0.25
shoal_kv_cache_usage_ratio{model="tiny",pool="q"} 0.5
# TYPE other_total counter
other_total 7.0
"""
    assert parse_worker_load(text) == WorkerLoad(running=4, waiting=3, kv_cache_usage=0.5)


def test_parse_worker_load_without_shoal_series_is_zero():
    assert parse_worker_load("# TYPE x gauge\nx 1\n") == WorkerLoad()


def test_parse_worker_load_rejects_garbage():
    with pytest.raises(ValueError):
        parse_worker_load("this is { not prometheus")


# -- state: stale loads and failure penalties expire --


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stale_loads_and_old_failures_are_forgotten():
    clock = Clock()
    state = GatewayState(clock=clock)
    state.record_load(A.endpoint, WorkerLoad(waiting=9))
    state.record_failure(B.endpoint)
    assert state.fresh_loads() == {A.endpoint: WorkerLoad(waiting=9)}
    assert state.penalized() == {B.endpoint}
    clock.now += max(LOAD_MAX_AGE_S, FAILURE_PENALTY_S) + 0.1
    assert state.fresh_loads() == {} and state.penalized() == set()


def test_inflight_is_counted_per_endpoint():
    state = GatewayState()
    state.acquire(A.endpoint)
    state.acquire(A.endpoint)
    state.release(A.endpoint)
    assert state.inflight == {A.endpoint: 1}
    state.release(A.endpoint)
    assert state.inflight == {}
