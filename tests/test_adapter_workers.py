"""Adapter affinity and on-demand loading in the gateway, in front of real `shoal serve`
workers (the gateway as a `shoal gateway --static` process, the real `openai` client).

Workers run one sequence at a time (--max-num-seqs 1), so a second request to a busy holder
really queues there: that is what "every holder is saturated" means to the gateway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shoal.operator.adapters_admin import WorkerAdmin
from tests.test_gateway_workers import Process, client_for, free_port, metric

MODEL, ADAPTER = "tiny", "sql"
LONG = 8000  # max_tokens of a request meant to keep a worker busy for seconds
MESSAGES = [{"role": "user", "content": "Write a query."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from shoal.runtime.testing import make_tiny_model

    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=LONG + 64
    )


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> str:
    from shoal.runtime.testing.adapters import make_tiny_adapter

    return str(make_tiny_adapter(model_dir, tmp_path_factory.mktemp("ad") / ADAPTER, seed=3))


@pytest.fixture(scope="module")
def workers(model_dir, tmp_path_factory) -> Iterator[list[Process]]:
    logs = tmp_path_factory.mktemp("worker-logs")
    argv = ["serve", "--model", str(model_dir), "--served-model-name", MODEL]
    argv += ["--max-num-seqs", "1", "--num-kv-blocks", str(2 * (LONG + 64) // 16 + 64)]
    procs = [Process(argv, logs / f"worker{i}.log", free_port()) for i in range(2)]
    try:
        yield [p.wait_healthy() for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def gateway(workers, tmp_path_factory) -> Iterator[Process]:
    args = ["gateway", "--scrape-interval", "0.3"]
    args += ["--static", f"{MODEL}={workers[0].url},{workers[1].url}"]
    gw = Process(args, tmp_path_factory.mktemp("gw") / "gw.log", free_port()).wait_healthy()
    yield gw
    gw.stop()


def held(url: str) -> set[str]:
    return {a.name for a in WorkerAdmin().list(url)}


def wait_until(what: str, fn, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_holder_first_then_on_demand_load_when_the_holder_is_saturated(
    gateway, workers, adapter_dir
):
    holder, other = workers
    assert WorkerAdmin().load(holder.url, ADAPTER, adapter_dir) is None
    wait_until(
        "the gateway to see the holder",
        lambda: metric(gateway.url, "shoal_gateway_adapter_workers", adapter=ADAPTER) == 1,
    )
    card = next(m for m in client_for(gateway.url).models.list() if m.id == ADAPTER)
    assert (card.model_extra or {}).get("parent") == MODEL

    # Idle: every request goes to the holder, never loads elsewhere.
    for _ in range(3):
        raw = client_for(gateway.url).chat.completions.with_raw_response.create(
            model=ADAPTER, messages=MESSAGES, max_tokens=4, temperature=0
        )
        assert raw.headers["x-shoal-worker"] == holder.url
    assert held(other.url) == set()

    body = {"model": ADAPTER, "prompt": "A long query", "max_tokens": LONG, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json={**body, "stream": True}) as a:
        assert a.headers["x-shoal-worker"] == holder.url
        chunks = a.iter_raw()
        next(chunks)  # running on the holder now
        # A second one queues behind it (one sequence at a time): the holder is saturated.
        queued = threading.Thread(
            target=lambda: httpx.post(
                f"{gateway.url}/v1/completions",
                json={"model": ADAPTER, "prompt": "q", "max_tokens": 2},
                timeout=120,
            ),
            daemon=True,
        )
        queued.start()
        wait_until(
            "a request waiting on the holder",
            lambda: metric(holder.url, "shoal_num_requests_waiting") >= 1,
        )
        time.sleep(1.0)  # a few gateway scrapes see it
        raw = client_for(gateway.url).chat.completions.with_raw_response.create(
            model=ADAPTER, messages=MESSAGES, max_tokens=4, temperature=0
        )
        assert raw.headers["x-shoal-worker"] == other.url
        assert raw.parse().choices[0].message.content
    queued.join(timeout=120)
    assert ADAPTER in held(other.url)  # loaded there by the gateway, through the admin API
    labels = {"model": MODEL, "adapter": ADAPTER}
    assert metric(gateway.url, "shoal_gateway_adapter_loads_total", result="ok", **labels) == 1
    assert metric(gateway.url, "shoal_gateway_adapter_requests_total", route="on_demand") == 1


def test_an_adapter_no_worker_holds_and_nobody_declared_is_404(gateway):
    with pytest.raises(openai.NotFoundError) as err:
        client_for(gateway.url).chat.completions.create(
            model="never-loaded", messages=MESSAGES, max_tokens=2
        )
    assert err.value.code == "model_not_found"


def test_a_stale_holder_is_forgotten_and_the_declared_adapter_loaded_elsewhere(
    workers, adapter_dir
):
    """The operator moved an adapter after the gateway's last scrape: the old holder answers
    404, and the gateway, instead of passing that on, loads it on another worker."""
    from fastapi.testclient import TestClient

    from shoal.runtime.gateway.adapters import DeclaredAdapter
    from shoal.runtime.gateway.app import GatewayConfig, create_app
    from shoal.runtime.gateway.discovery import StaticDiscovery
    from shoal.runtime.gateway.pools import Pool, Worker
    from shoal.runtime.gateway.state import GatewayState

    name = "moved"
    old, new = workers
    admin = WorkerAdmin()
    assert admin.load(old.url, name, adapter_dir) is None
    state = GatewayState()
    state.adapters.set_declared({name: DeclaredAdapter(name, MODEL, adapter_dir)})
    pool = Pool(MODEL, (Worker("old", old.url), Worker("new", new.url)))
    # One scrape at start, then none: the gateway's view stays as it was.
    config = GatewayConfig(scrape_interval_s=3600)
    with TestClient(create_app(StaticDiscovery({MODEL: pool}), config, state)) as http:
        wait_until("the first scrape", lambda: state.adapters.holders(name) == {old.url})
        assert admin.unload(old.url, name) is None  # moved away behind the gateway's back
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=MESSAGES, max_tokens=4, temperature=0
        )
        assert raw.headers["x-shoal-worker"] == "new"
        assert raw.parse().choices[0].message.content
        assert state.adapters.holders(name) == {new.url}
        assert state.penalized() == set()  # the old holder is fine, only the view was stale
    assert name in held(new.url) and name not in held(old.url)
