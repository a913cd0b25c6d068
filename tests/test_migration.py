"""Live migration between two in-process workers (real engines, real uvicorn, real gRPC)
on the tiny Llama: staged KV copy, token-exact continuation (greedy and seeded), the
stream's marker and the target's resume endpoint, drain, and faults at each stage."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.runtime.config import EngineConfig
from shoal.runtime.migration import marker
from shoal.runtime.migration import migration_pb2 as pb
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


def _metric(worker: Worker, name: str, **labels: str) -> float:
    """The sum of a worker's samples named `name` whose labels include `labels`."""
    text = httpx.get(f"{worker.url}/metrics", trust_env=False).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


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

    succeeded = _metric(a, "shoal_migrations_total", outcome="succeeded")
    downtimes = _metric(a, "shoal_migration_downtime_seconds_count")
    sent = _metric(a, "shoal_migration_bytes_total")
    outcomes = []
    moved = stream_completion(
        a.url, _body(), lambda rid: outcomes.append(a.agent.migrate(rid, b.grpc_target))
    )
    assert outcomes and outcomes[0].ok, outcomes
    assert moved.hops and moved.hops[0].startswith(b.url)
    assert _metric(a, "shoal_migrations_total", outcome="succeeded") == succeeded + 1
    assert _metric(a, "shoal_migration_downtime_seconds_count") == downtimes + 1
    assert _metric(a, "shoal_migration_bytes_total") == sent + outcomes[0].bytes
    assert _metric(a, "shoal_worker_draining") == 0
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


# ---- faults at each stage: the request goes on at the source, output still exact -----


class TcpProxy:
    """A real TCP forwarder in front of a worker's gRPC port, so a test can cut the
    connection between two workers at a chosen stage (kill())."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _aborted(worker: Worker, reason: str) -> float:
    return _metric(worker, "shoal_migrations_total", outcome="aborted", reason=reason)


def _free_blocks(worker: Worker) -> int:
    return worker.agent.load().free_blocks


def _run_with_fault(a: Worker, target: str, hook, max_tokens: int = LONG) -> tuple:
    reference = stream_completion(a.url, _body(max_tokens))
    outcomes = []

    def go(rid):
        outcomes.append(a.agent.migrate(rid, target, on_stage=hook))

    got = stream_completion(a.url, _body(max_tokens), go)
    assert got.tokens == reference.tokens and got.text == reference.text
    assert not got.hops  # it never left the source
    return outcomes[0]


def test_reserve_refused_by_a_full_target(pair):
    a, b = pair
    stub = b.stub()
    hog = stub.Reserve(pb.ReserveRequest(request_id="hog", num_blocks=_free_blocks(b),
                                         layout=a.agent.engine.call_in_step(_layout).result()))  # fmt: skip
    assert hog.ok, hog
    before = _aborted(a, "target_full")
    try:
        outcome = _run_with_fault(a, b.grpc_target, None)
    finally:
        assert stub.Release(pb.ReleaseRequest(request_id="hog")).released
    assert not outcome.ok and outcome.reason == "target_full"
    assert _aborted(a, "target_full") == before + 1


def test_reserve_refused_by_a_draining_target(pair):
    a, b = pair
    b.agent.set_draining(True)
    try:
        outcome = _run_with_fault(a, b.grpc_target, None)
    finally:
        b.agent.set_draining(False)
    assert not outcome.ok and outcome.reason == "target_draining"


@pytest.mark.parametrize("stage", ["copied", "paused"])
def test_connection_lost_mid_copy_or_before_resume(pair, stage):
    """`copied`: cut between two copy stages; `paused`: the target is gone when the
    source stops the request for its last copy (it dies before resuming it)."""
    a, b = pair
    proxy = TcpProxy(b.agent.grpc_port)
    before = _aborted(a, "connection_lost")
    free_before = _free_blocks(a)

    def hook(name):
        if name == stage:
            proxy.kill()

    outcome = _run_with_fault(a, f"127.0.0.1:{proxy.port}", hook)
    assert not outcome.ok and outcome.reason == "connection_lost", outcome
    assert _aborted(a, "connection_lost") == before + 1
    assert _free_blocks(a) == free_before  # the source freed the request's blocks at the end


def test_request_finished_during_the_copy(pair):
    a, b = pair
    free_b = _free_blocks(b)

    def hook(name):
        if name == "reserved":  # let the request run to its end before the first copy
            deadline = time.monotonic() + 30
            while a.agent.load().requests and time.monotonic() < deadline:
                time.sleep(0.005)

    outcome = _run_with_fault(a, b.grpc_target, hook, max_tokens=40)
    assert not outcome.ok and outcome.reason == "finished"
    assert _free_blocks(b) == free_b  # the target's reservation was released


def _layout(engine):
    from shoal.runtime.migration import kv

    return kv.layout(engine)


# ---- drain -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tiny_llama) -> Iterator[Worker]:
    """A worker that runs 2 requests at a time, so others wait in its queue."""
    with running_worker(_config(tiny_llama, max_num_seqs=2), grpc_port=0) as (url, app):
        app.state.shoal.migration.http_port = int(url.rsplit(":", 1)[1])
        yield Worker(url, app)


def test_drain_moves_running_and_waiting_requests_and_refuses_new_ones(small, pair):
    _, b = pair
    reference = stream_completion(b.url, _body(200))
    results: list[Streamed] = []
    threads = [
        threading.Thread(target=lambda: results.append(stream_completion(small.url, _body(200))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    stub = small.stub()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        load = stub.GetLoad(pb.LoadRequest())
        if load.num_running == 2 and load.num_waiting == 2:
            break
        time.sleep(0.002)
    assert (load.num_running, load.num_waiting) == (2, 2), load
    assert len(load.requests) == 4 and load.total_blocks == 256 and 0 < load.kv_usage < 1

    reply = stub.Drain(pb.DrainRequest(targets=[b.grpc_target], timeout_s=60))
    try:
        assert (reply.migrated, reply.remaining) == (4, 0), reply
        assert stub.GetLoad(pb.LoadRequest()).draining
        refused = httpx.post(f"{small.url}/v1/completions", json=_body(4, stream=False))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "worker_draining"
        admin = httpx.get(f"{small.url}/admin/load", trust_env=False).json()
        assert admin["draining"] is True and admin["num_running"] == 0
    finally:
        assert not stub.Undrain(pb.UndrainRequest()).draining
    for t in threads:
        t.join(120)
    assert len(results) == 4
    for r in results:
        assert r.hops and r.hops[0].startswith(b.url)
        assert r.tokens == reference.tokens
    ok = httpx.post(f"{small.url}/v1/completions", json=_body(4, stream=False))
    assert ok.status_code == 200


def test_http_drain_mirror_with_nothing_to_move(small, pair):
    _, b = pair
    r = httpx.post(f"{small.url}/admin/drain", json={"targets": [b.grpc_target]}, trust_env=False)
    try:
        assert r.status_code == 200 and r.json() == {
            "migrated": 0, "failed": 0, "remaining": 0, "errors": []
        }  # fmt: skip
        assert small.agent.draining
    finally:
        httpx.post(f"{small.url}/admin/undrain", trust_env=False)
    assert not small.agent.draining
    bad = httpx.post(f"{small.url}/admin/drain", json={"targets": 5}, trust_env=False)
    assert bad.status_code == 400 and "targets" in bad.json()["error"]["message"]


def test_gateway_sends_nothing_to_a_draining_worker(pair, gateway):
    a, b = pair
    a.agent.set_draining(True)
    try:
        client = _openai(gateway)
        for _ in range(4):
            raw = client.completions.with_raw_response.create(
                model="tiny", prompt=PROMPT, max_tokens=4, temperature=0.0
            )
            assert raw.headers["x-shoal-worker"] == b.url
            assert raw.parse().usage.completion_tokens == 4
    finally:
        a.agent.set_draining(False)


def test_client_leaving_after_a_move_aborts_the_request_on_the_target(pair, gateway):
    a, b = pair
    finished = {w.url: _metric(w, "shoal_e2e_request_latency_seconds_count") for w in pair}
    client = _openai(gateway)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1900,
                                       temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    release = threading.Event()
    deadline = time.monotonic() + 120  # a bound for a stuck test, not a timing assertion
    for n, _ in enumerate(stream, 1):
        if n == 8:
            outcome = _migrate_whatever_runs(pair)
            assert outcome.ok, outcome
            dst = a if outcome.target_url == a.url else b
            (rid,) = [r.request_id for r in dst.agent.load().requests]
            while rid in dst.agent.target.resumable and time.monotonic() < deadline:
                time.sleep(0.001)  # until the gateway has resumed the stream there
            # Hold the target's step thread, so the request cannot run to its end
            # before the client's leaving reaches it (the tiny model is fast).
            dst.agent.engine.call_in_step(lambda e: release.wait(60))
            break
    stream.close()
    release.set()
    while time.monotonic() < deadline and (a.agent.load().requests or b.agent.load().requests):
        time.sleep(0.05)
    assert not a.agent.load().requests and not b.agent.load().requests
    for w in pair:  # aborted: it never finished anywhere
        assert _metric(w, "shoal_e2e_request_latency_seconds_count") == finished[w.url]


# ---- adapters ----------------------------------------------------------------------------


def test_adapter_request_moves_only_where_its_adapter_is_and_stays_exact(
    pair, tiny_llama, tmp_path
):
    from shoal.runtime.testing import make_tiny_adapter

    a, b = pair
    path = make_tiny_adapter(tiny_llama, tmp_path / "mig-ad", seed=3)
    load = {"lora_name": "mig-ad", "lora_path": str(path)}
    assert httpx.post(f"{a.url}/v1/load_lora_adapter", json=load).status_code == 200
    body = _body(model="mig-ad")
    reference = stream_completion(a.url, body)
    assert reference.tokens != stream_completion(a.url, _body()).tokens  # the adapter matters

    def move(rid):
        outcomes.append(a.agent.migrate(rid, b.grpc_target))

    outcomes: list = []  # b lacks the adapter: refused, the request goes on at a
    stayed = stream_completion(a.url, body, move)
    assert not outcomes[0].ok and outcomes[0].reason == "adapter_missing"
    assert outcomes[0].bytes == 0  # refused at the reservation, before any copy
    assert stayed.tokens == reference.tokens and not stayed.hops

    assert httpx.post(f"{b.url}/v1/load_lora_adapter", json=load).status_code == 200
    try:
        outcomes = []
        moved = stream_completion(a.url, body, move)
        assert outcomes[0].ok, outcomes
        assert moved.hops and moved.tokens == reference.tokens and moved.text == reference.text
    finally:
        for w in pair:
            httpx.post(f"{w.url}/v1/unload_lora_adapter", json={"lora_name": "mig-ad"})


def test_stop_string_after_the_move_cuts_the_same_text(pair):
    """Stop conditions and the detokenizer's held-back text travel with the request."""
    a, b = pair
    full = stream_completion(a.url, _body(200))
    stop = full.text[len(full.text) * 3 // 4 :][:4]  # late: after the move
    assert stop.strip()
    body = _body(200, stop=[stop])
    reference = stream_completion(a.url, body)
    assert reference.finish_reason == "stop" and stop not in reference.text
    outcomes: list = []
    moved = stream_completion(
        a.url, body, lambda rid: outcomes.append(a.agent.migrate(rid, b.grpc_target))
    )
    assert outcomes[0].ok and moved.hops
    assert moved.text == reference.text and moved.finish_reason == "stop"
