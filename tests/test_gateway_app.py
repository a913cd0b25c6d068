"""The gateway app on its own: answers it gives without reaching a worker.

Driven through the real `openai` client over the app's ASGI interface (Starlette's
TestClient is an httpx.Client), so the errors are checked the way a user sees them.
"""

from __future__ import annotations

import socket

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shoal.runtime.gateway.app import GatewayConfig, create_app
from shoal.runtime.gateway.discovery import StaticDiscovery
from shoal.runtime.gateway.pools import Pool, Worker


def dead_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture()
def gateway():
    dead = [dead_url(), dead_url()]
    pools = {
        "empty": Pool("empty"),
        "down": Pool("down", tuple(Worker(f"w{i}", url) for i, url in enumerate(dead))),
    }
    app = create_app(StaticDiscovery(pools), GatewayConfig(max_attempts=3, scrape_interval_s=0.2))
    with TestClient(app) as http:
        yield http


@pytest.fixture()
def client(gateway):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=gateway, max_retries=0
    )


def samples(http: TestClient) -> dict[tuple[str, tuple], float]:
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_models_lists_every_pool_even_without_workers(client):
    assert sorted(m.id for m in client.models.list()) == ["down", "empty"]


def test_models_retrieve_one_or_404(client):
    assert client.models.retrieve("empty").id == "empty"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_is_ok_once_discovery_has_run(gateway):
    body = gateway.get("/health").json()
    assert body == {"status": "ok", "models": 2, "ready_workers": 2}


def test_unknown_model_is_openai_404_model_not_found(client, gateway):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    assert "nope" in err.value.message
    assert samples(gateway)[("shoal_gateway_requests_total", (("code", "404"), ("model", "")))] == 1


def test_pool_without_ready_worker_is_503(client, gateway):
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="empty", prompt="hi")
    assert err.value.status_code == 503
    assert err.value.code == "no_ready_worker"
    key = ("shoal_gateway_requests_total", (("code", "503"), ("model", "empty")))
    assert samples(gateway)[key] == 1


def test_every_worker_refusing_is_502_after_trying_each_once(client, gateway):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="down", prompt="hi", stream=True)
    assert err.value.status_code == 502
    assert "2 attempt(s)" in err.value.message
    metrics = samples(gateway)
    # two workers, max_attempts 3: each tried once, so one retry, then give up
    assert metrics[("shoal_gateway_upstream_retries_total", (("model", "down"),))] == 1
    assert metrics[("shoal_gateway_ready_workers", (("model", "down"),))] == 2
    assert metrics[("shoal_gateway_ready_workers", (("model", "empty"),))] == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "hi"}', "`model` is required"),
        (b'{"model": 7}', "`model` is required"),
    ],
)
def test_bad_bodies_are_openai_400s(gateway, body, message):
    response = gateway.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
