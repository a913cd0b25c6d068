"""Live migration between two in-process workers (real engines, real uvicorn, real gRPC)
on the tiny Llama: staged KV copy, token-exact continuation (greedy and seeded), the
stream's marker and the target's resume endpoint, drain, and faults at each stage."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest

from shoal.runtime.config import EngineConfig
from shoal.runtime.migration import marker
from shoal.runtime.migration import migration_pb2_grpc as pb_grpc
from shoal.runtime.server.local import running_worker

PROMPT = list(range(5, 60))  # 55 tokens: 3 full blocks of 16 and a partial one
LONG = 400  # output tokens: enough decode steps for the migration to happen mid-stream


@dataclass
class Worker:
    url: str
    app: Any

    @property
    def agent(self):
        return self.app.state.shoal.migration

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.agent.grpc_port}"

    def stub(self):
        return pb_grpc.MigrationStub(grpc.insecure_channel(self.grpc_target))


def _config(model, **kw) -> EngineConfig:
    base = dict(model=str(model), served_model_name="tiny", dtype="float32", num_kv_blocks=256)
    return EngineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pair(tiny_llama) -> Iterator[tuple[Worker, Worker]]:
    with (
        running_worker(_config(tiny_llama), grpc_port=0) as (url_a, app_a),
        running_worker(_config(tiny_llama), grpc_port=0) as (url_b, app_b),
    ):
        for url, app in ((url_a, app_a), (url_b, app_b)):
            app.state.shoal.migration.http_port = int(url.rsplit(":", 1)[1])
        yield Worker(url_a, app_a), Worker(url_b, app_b)


def _body(max_tokens: int = LONG, **kw) -> dict:
    return {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
        **kw,
    }


@dataclass
class Streamed:
    request_id: str
    text: str
    tokens: list[str]
    logprobs: list[float]
    finish_reason: str | None
    hops: list[str]  # resume URLs followed
    events: int


def _read_events(response: httpx.Response) -> Iterator[bytes]:
    splitter = marker.SSEEvents()
    for chunk in response.iter_raw():
        yield from splitter.feed(chunk)


def stream_completion(
    base_url: str, body: dict, on_tokens: Any = None, at_tokens: int = 8
) -> Streamed:
    """Stream from a worker, following migration markers the way the gateway does.
    `on_tokens(request_id)` is called once after `at_tokens` tokens arrived."""
    out = Streamed("", "", [], [], None, [], 0)
    fired = False
    with httpx.Client(timeout=120, trust_env=False) as client:
        url, payload = f"{base_url}/v1/completions", body
        while True:
            moved = None
            with client.stream("POST", url, json=payload) as response:
                assert response.status_code == 200, response.read()
                out.request_id = out.request_id or response.headers["x-request-id"]
                for event in _read_events(response):
                    found = marker.parse_event(event)
                    if found:
                        moved = found
                        break
                    data = event.decode().removeprefix("data: ").strip()
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    assert "error" not in chunk, chunk
                    out.events += 1
                    assert chunk["id"] == out.request_id
                    for choice in chunk["choices"]:
                        out.text += choice["text"]
                        if choice.get("logprobs"):
                            out.tokens += choice["logprobs"]["tokens"]
                            out.logprobs += choice["logprobs"]["token_logprobs"]
                        out.finish_reason = choice["finish_reason"] or out.finish_reason
                    if on_tokens and not fired and len(out.tokens) >= at_tokens:
                        fired = True
                        on_tokens(out.request_id)
            if moved is None:
                return out
            url, payload = moved
            out.hops.append(url)


def test_greedy_migration_mid_stream_is_token_exact(pair):
    a, b = pair
    reference = stream_completion(a.url, _body())
    assert len(reference.tokens) == LONG and not reference.hops

    outcomes = []
    moved = stream_completion(
        a.url, _body(), lambda rid: outcomes.append(a.agent.migrate(rid, b.grpc_target))
    )
    assert outcomes and outcomes[0].ok, outcomes
    assert moved.hops and moved.hops[0].startswith(b.url)
    assert moved.tokens == reference.tokens
    assert moved.text == reference.text
    assert moved.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
    assert moved.finish_reason == "length"
    assert outcomes[0].bytes > 0 and outcomes[0].stages >= 1


def test_seeded_sampling_migration_is_token_exact(pair):
    a, b = pair
    body = _body(temperature=1.0, seed=1234, top_p=0.9)
    reference = stream_completion(a.url, body)
    outcomes = []
    moved = stream_completion(
        a.url, body, lambda rid: outcomes.append(a.agent.migrate(rid, b.grpc_target)), 20
    )
    assert outcomes and outcomes[0].ok, outcomes
    assert moved.tokens == reference.tokens
    assert moved.text == reference.text


# ---- through the gateway, with the openai client ---------------------------------------


@pytest.fixture(scope="module")
def gateway(pair) -> Iterator[str]:
    from shoal.runtime.gateway.app import GatewayConfig, create_app
    from shoal.runtime.gateway.discovery import StaticDiscovery
    from shoal.runtime.gateway.pools import parse_static
    from shoal.runtime.server.local import serve_in_thread

    a, b = pair
    pools = parse_static([f"tiny={a.url},{b.url}"])
    app = create_app(StaticDiscovery(pools), GatewayConfig(scrape_interval_s=0.2))
    with serve_in_thread(app) as url:
        yield url


def _openai(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gateway_url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=120),
    )


def _migrate_whatever_runs(pair, min_output_tokens: int = 5, timeout: float = 60) -> Any:
    """Wait until one worker runs a request with some output, move it to the other."""
    a, b = pair
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for src, dst in ((a, b), (b, a)):
            for r in src.agent.load().requests:
                if r.num_output_tokens >= min_output_tokens:
                    return src.agent.migrate(r.request_id, dst.grpc_target)
        time.sleep(0.002)
    raise AssertionError("no request ran long enough to be migrated")


def test_gateway_stream_follows_a_migrated_request(pair, gateway):
    client = _openai(gateway)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=LONG, temperature=0.0, stream=True,
              extra_body={"ignore_eos": True})  # fmt: skip
    reference = "".join(c.choices[0].text for c in client.completions.create(**kw))

    chunks, ids, outcome = [], set(), []
    for chunk in client.completions.create(**kw):
        ids.add(chunk.id)
        chunks.append(chunk)
        if len(chunks) == 8:
            outcome.append(_migrate_whatever_runs(pair))
    assert outcome[0].ok, outcome
    assert len(ids) == 1  # one stream, one id, across the move
    assert "".join(c.choices[0].text for c in chunks) == reference
    assert chunks[-1].choices[0].finish_reason == "length"


def test_gateway_chat_stream_with_usage_follows_a_migrated_request(pair, gateway):
    client = _openai(gateway)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}],
              max_tokens=LONG, temperature=0.0, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip

    def run(migrate: bool) -> tuple[str, Any, list]:
        text, usage, outcome = "", None, []
        for n, chunk in enumerate(client.chat.completions.create(**kw), 1):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
            if migrate and n == 8:
                outcome.append(_migrate_whatever_runs(pair))
        return text, usage, outcome

    reference, ref_usage, _ = run(False)
    text, usage, outcome = run(True)
    assert outcome[0].ok, outcome
    assert text == reference
    assert usage.completion_tokens == ref_usage.completion_tokens == LONG
    assert usage.prompt_tokens == ref_usage.prompt_tokens


def test_gateway_non_streaming_request_survives_a_migration(pair, gateway):
    client = _openai(gateway)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=LONG, temperature=0.0, logprobs=1,
              extra_body={"ignore_eos": True})  # fmt: skip
    reference = client.completions.create(**kw)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(client.completions.create(**kw)))
    worker.start()
    outcome = _migrate_whatever_runs(pair)
    worker.join(120)
    assert outcome.ok, outcome
    got = result[0]
    assert got.choices[0].text == reference.choices[0].text
    assert got.choices[0].logprobs.tokens == reference.choices[0].logprobs.tokens
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(
        reference.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    assert got.usage.completion_tokens == LONG
