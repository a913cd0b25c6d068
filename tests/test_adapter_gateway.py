"""Adapters in the gateway, the pure parts: which pool, which worker, when to load."""

from __future__ import annotations

import pytest

from shoal.runtime.gateway.adapters import (
    AdapterRegistry,
    DeclaredAdapter,
    HeldAdapter,
    adapter_card,
    declared_adapters,
    parse_held,
    route_adapter,
)
from shoal.runtime.gateway.pools import Pool, Worker
from shoal.runtime.gateway.routing import WorkerLoad

W = [Worker(f"w{i}", f"http://10.0.0.{i}:8000") for i in range(3)]
E = [w.endpoint for w in W]
POOLS = {"base": Pool("base", tuple(W)), "other": Pool("other", ())}
IDLE = WorkerLoad()
QUEUED = WorkerLoad(running=8, waiting=2)


def mdep(name, base, adapters):
    return {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"model": {"name": base, "source": "/m"}, "adapters": adapters},
    }


def test_declared_adapters_read_from_modeldeployments():
    got = declared_adapters(
        [
            mdep("a", "base", [{"name": "sql", "source": "file:///ad/sql"}, {"name": 3}]),
            mdep("b", "other", "not a list"),
            {"metadata": {}, "spec": {}},
        ]
    )
    assert got == {"sql": DeclaredAdapter("sql", "base", "/ad/sql")}


def test_parse_held_reads_the_worker_list_and_rejects_other_bodies():
    body = {"object": "list", "data": [{"name": "sql", "path": "/ad/sql", "running": 2}]}
    assert parse_held(body) == [HeldAdapter("sql", "/ad/sql", 2)]
    with pytest.raises(ValueError):
        parse_held({"detail": "Not Found"})


def test_an_adapter_belongs_to_its_declared_base_or_the_pool_of_its_holders():
    reg = AdapterRegistry()
    reg.set_declared({"sql": DeclaredAdapter("sql", "base", "/ad/sql")})
    reg.record_held(E[2], [HeldAdapter("byhand", "/ad/h")])
    assert reg.base_of("sql", POOLS) == "base"  # declared, no holder yet
    assert reg.base_of("byhand", POOLS) == "base"  # loaded by hand on a worker of "base"
    assert reg.base_of("nope", POOLS) is None
    assert reg.path_of("byhand") == "/ad/h"
    assert reg.listed(POOLS) == [("byhand", "base", "/ad/h"), ("sql", "base", "/ad/sql")]
    reg.retain({E[0]})  # w2 left the pool: what it held is forgotten
    assert reg.base_of("byhand", POOLS) is None


def test_adapter_card_names_its_parent():
    card = adapter_card("sql", "base", "/ad/sql")
    assert (card["id"], card["parent"], card["root"], card["object"]) == (
        "sql",
        "base",
        "/ad/sql",
        "model",
    )


def test_routes_to_the_least_loaded_holder():
    route = route_adapter(W, {E[0], E[2]}, {E[0]: 3, E[1]: 0, E[2]: 1}, {})
    assert (route.worker, route.needs_load) == (W[2], False)


def test_idle_holder_wins_even_when_a_non_holder_is_emptier():
    route = route_adapter(W, {E[0]}, {E[0]: 2}, {E[0]: IDLE})
    assert (route.worker, route.needs_load) == (W[0], False)


def test_no_holder_means_load_on_the_least_loaded_worker():
    route = route_adapter(W, set(), {E[0]: 2, E[1]: 1, E[2]: 4}, {})
    assert (route.worker, route.needs_load) == (W[1], True)


def test_every_holder_saturated_means_load_on_a_less_loaded_worker():
    loads = {E[0]: QUEUED, E[1]: QUEUED, E[2]: IDLE}
    route = route_adapter(W, {E[0], E[1]}, {E[0]: 9, E[1]: 9}, loads)
    assert (route.worker, route.needs_load) == (W[2], True)
    # ... but not on a worker that is busier still: the saturated holder stays the answer.
    loads = {E[0]: QUEUED, E[1]: WorkerLoad(waiting=20), E[2]: WorkerLoad(waiting=20)}
    route = route_adapter(W, {E[0]}, {}, loads)
    assert (route.worker, route.needs_load) == (W[0], False)


def test_kv_pressure_counts_as_saturated():
    loads = {E[0]: WorkerLoad(kv_cache_usage=0.95), E[1]: IDLE}
    route = route_adapter(W[:2], {E[0]}, {}, loads)
    assert (route.worker, route.needs_load) == (W[1], True)


def test_tried_workers_are_excluded_and_none_when_nothing_is_left():
    route = route_adapter(W, {E[0]}, {}, {}, exclude={E[0]})
    assert route.worker in (W[1], W[2]) and route.needs_load
    assert route_adapter(W, {E[0]}, {}, {}, exclude=set(E)) is None
