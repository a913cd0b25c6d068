"""The worker's OpenAI server.

First the pure parts without I/O (request conversion, SSE chunks, metrics, CLI parsing),
then the real thing: uvicorn on 127.0.0.1 serving a tiny Llama through the real engine,
checked against the engine's own offline output.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shoal.runtime.cli import check_model_dir, parse_size, url_for
from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.outputs import (
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from shoal.runtime.sampling_params import SamplingParams
from shoal.runtime.server import convert
from shoal.runtime.server.errors import APIError
from shoal.runtime.server.metrics import ServerMetrics, request_latencies
from shoal.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from shoal.runtime.server.streaming import DONE, ChatChunks, CompletionChunks, sse

# ----------------------------------------------------------------------------- pure


def test_parse_size_units():
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4Gi") == 4 * 1024**3
    assert parse_size("1000") == 1000
    for bad in ["", "lots", "2XB", "-1GiB", "0"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_check_model_dir_says_what_is_missing(tmp_path):
    assert "no such directory" in check_model_dir(str(tmp_path / "nope"))
    assert "no config.json" in check_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert check_model_dir(str(tmp_path)) is None
    assert url_for("::1", 80) == "http://[::1]:80"


def test_resolve_max_tokens():
    fit = dict(prompt_len=10, max_model_len=100)
    assert convert.resolve_max_tokens(None, **fit, default=16) == 16
    assert convert.resolve_max_tokens(None, **fit, default=None) == 90
    assert convert.resolve_max_tokens(None, prompt_len=95, max_model_len=100, default=16) == 5
    assert convert.resolve_max_tokens(90, **fit, default=16) == 90
    with pytest.raises(APIError) as exc:
        convert.resolve_max_tokens(91, **fit, default=16)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"
    with pytest.raises(APIError) as exc:
        convert.resolve_max_tokens(0, **fit, default=16, param="max_completion_tokens")
    assert exc.value.param == "max_completion_tokens"
    with pytest.raises(APIError) as exc:
        convert.resolve_max_tokens(None, prompt_len=100, max_model_len=100, default=16)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "prompt"


def test_sampling_params_from_request():
    req = parse_request(
        CompletionRequest,
        {"model": "m", "prompt": "x", "temperature": 0, "stop": "END", "top_k": 5, "seed": 7},
    )
    params = convert.sampling_params(req, max_tokens=9, logprobs=2)
    assert params.greedy and params.stop == ["END"] and params.top_k == 5 and params.seed == 7
    assert params.max_tokens == 9 and params.logprobs == 2
    defaults = convert.sampling_params(
        parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}),
        max_tokens=1,
        logprobs=None,
    )
    assert defaults.temperature == 1.0 and defaults.top_p == 1.0 and defaults.top_k == -1
    bad = parse_request(CompletionRequest, {"model": "m", "prompt": "x", "top_p": 0})
    with pytest.raises(APIError) as exc:
        convert.sampling_params(bad, max_tokens=1, logprobs=None)
    assert exc.value.status == 400 and exc.value.param == "top_p"


def test_chat_logprobs_mapping_and_prompt_shapes():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert convert.chat_logprobs_k(parse_request(ChatCompletionRequest, chat)) is None
    on = parse_request(ChatCompletionRequest, {**chat, "logprobs": True})
    assert convert.chat_logprobs_k(on) == 0
    top = parse_request(ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 3})
    assert convert.chat_logprobs_k(top) == 3
    for prompt, expected in [("a", "a"), (["a"], "a"), ([[1, 2]], [1, 2]), ([3, 4], [3, 4])]:
        req = parse_request(CompletionRequest, {"model": "m", "prompt": prompt})
        assert req.prompt == expected


class Vocab:
    """Token text from a table, for the pure tests (the server uses TokenText)."""

    def __init__(self, table):
        self.table = table

    def text(self, token_id):
        return self.table.get(token_id, f"<{token_id}>")

    def bytes(self, token_id):
        return list(self.text(token_id).encode())


def _choice(index, new_ids, new_text, text, finish=None, logprobs=None):
    return CompletionOutput(
        index=index,
        token_ids=list(range(len(text))),
        text=text,
        new_token_ids=new_ids,
        new_text=new_text,
        logprobs=logprobs,
        finish_reason=finish,
    )


def _out(choices, finished=False):
    return RequestOutput("r", [1, 2, 3], choices, finished, num_cached_tokens=1)


def test_completion_chunks_report_each_finish_once():
    builder = CompletionChunks(
        request_id="cmpl-1",
        created=1,
        model="m",
        decode=Vocab({}),
        logprobs=False,
        include_usage=True,
    )
    step1 = _out([_choice(0, [5], "a", "a", "stop"), _choice(1, [6], "b", "b")])
    step2 = _out([_choice(0, [], "", "a", "stop"), _choice(1, [7], "c", "bc", "length")], True)
    chunks = builder.chunks(step1) + builder.chunks(step2)
    got = [(c.choices[0].index, c.choices[0].text, c.choices[0].finish_reason) for c in chunks]
    assert got == [(0, "a", "stop"), (1, "b", None), (1, "c", "length")]
    usage = builder.usage_chunk(step2)
    assert usage.choices == [] and usage.usage.prompt_tokens == 3
    assert usage.usage.completion_tokens == 3 and usage.usage.total_tokens == 6
    assert usage.usage.prompt_tokens_details.cached_tokens == 1


def test_chat_chunks_open_with_role_and_carry_logprobs():
    builder = ChatChunks(
        request_id="c", created=1, model="m", decode=Vocab({}), logprobs=True,
        include_usage=False,
    )  # fmt: skip
    first = builder.first_chunks(2)
    assert [c.choices[0].delta.role for c in first] == ["assistant", "assistant"]
    entry = TokenLogprob(token_id=5, logprob=float("-inf"), top=[(5, -0.1), (9, -2.0)])
    (chunk,) = builder.chunks(_out([_choice(0, [5], "x", "x", logprobs=[entry])]))
    payload = json.loads(sse(chunk).removeprefix("data: "))  # JSON has no -Infinity
    content = payload["choices"][0]["logprobs"]["content"][0]
    assert content["token"] == "<5>" and content["logprob"] == convert.MIN_LOGPROB
    assert [t["token"] for t in content["top_logprobs"]] == ["<5>", "<9>"]
    assert builder.usage_chunk(_out([], True)) is None
    assert DONE == "data: [DONE]\n\n"


def test_completion_logprobs_offsets():
    entries = [TokenLogprob(1, -0.5, [(1, -0.5)]), TokenLogprob(2, -1.0, [(2, -1.0)])]
    lp = convert.completion_logprobs(entries, Vocab({1: "ab", 2: "c"}), start_offset=4)
    assert lp.tokens == ["ab", "c"] and lp.text_offset == [4, 6]
    assert lp.top_logprobs == [{"ab": -0.5}, {"c": -1.0}]


def test_request_latencies_are_observed_once():
    m = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5)
    assert request_latencies(m, False, False, None) == [("queue", 0.5)]
    m.first_token_time = m.last_token_time = 11.0
    assert request_latencies(m, True, False, None) == [("ttft", 1.0)]
    m.last_token_time = 11.25
    assert request_latencies(m, True, True, 11.0) == [("itl", 0.25)]
    assert request_latencies(m, True, True, 11.25) == []


def test_metrics_tracker_and_engine_collector():
    metrics = ServerMetrics("tiny", pool="p1", registry=CollectorRegistry())
    stats = EngineStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, prompt_tokens_total=7)
    metrics.watch_engine(lambda: stats)
    tracker = metrics.tracker()
    m = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.1)
    tracker.observe(m, finished=False)
    m.first_token_time = m.last_token_time = 0.3
    tracker.observe(m, finished=False)
    m.last_token_time = 0.35
    tracker.observe(m, finished=False)
    m.last_token_time = m.finished_time = 0.45
    tracker.observe(m, finished=True)
    tracker.observe(m, finished=True)  # a repeated final output must not count twice
    labels = {"model": "tiny", "pool": "p1"}
    get = metrics.registry.get_sample_value
    assert get("shoal_request_queue_time_seconds_count", labels) == 1
    assert get("shoal_time_to_first_token_seconds_sum", labels) == pytest.approx(0.3)
    assert get("shoal_inter_token_latency_seconds_count", labels) == 2
    assert get("shoal_inter_token_latency_seconds_sum", labels) == pytest.approx(0.15)
    assert get("shoal_e2e_request_latency_seconds_sum", labels) == pytest.approx(0.45)
    assert get("shoal_num_requests_running", labels) == 2
    assert get("shoal_kv_cache_usage_ratio", labels) == 0.25
    assert get("shoal_prompt_tokens_total", labels) == 7
    assert get("shoal_prefix_cache_queries_total", labels) == 0


def test_two_apps_in_one_process_do_not_clash():
    from shoal.runtime.server.api_server import build_app

    a = build_app(EngineConfig(model="/nonexistent/a"), pool="x")
    b = build_app(EngineConfig(model="/nonexistent/b"), pool="y")
    assert a.state.shoal.metrics.registry is not b.state.shoal.metrics.registry


# ------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    """The session's tiny Llama (tests/conftest.py)."""
    return str(tiny_llama)


def tiny_config(path: str, **overrides) -> EngineConfig:
    settings = dict(
        model=path,
        served_model_name="tiny",
        dtype="float32",
        device="cpu",
        max_model_len=256,
        max_num_seqs=8,
        max_num_batched_tokens=128,
        block_size=16,
        num_kv_blocks=96,
    )
    settings.update(overrides)
    return EngineConfig(**settings)


class Gate:
    """Holds the engine's construction until released, to observe /health while loading."""

    def __init__(self):
        self.event = threading.Event()

    def factory(self, config):
        from shoal.runtime.engine.async_engine import AsyncLLMEngine

        self.event.wait(120)
        return AsyncLLMEngine(config)


@pytest.fixture(scope="module")
def server(tiny_dir):
    from shoal.runtime.server.api_server import build_app
    from shoal.runtime.server.local import serve_in_thread, wait_healthy

    gate = Gate()
    app = build_app(tiny_config(tiny_dir), pool="test-pool", engine_factory=gate.factory)
    with serve_in_thread(app) as base_url:
        loading = httpx.get(f"{base_url}/health")
        not_ready = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
        gate.event.set()
        wait_healthy(base_url)
        yield base_url, app, loading, not_ready


@pytest.fixture(scope="module")
def offline(tiny_dir):
    """The engine's own output, driven directly (no server) for comparison."""
    from shoal.runtime.engine.llm_engine import LLMEngine

    return LLMEngine(tiny_config(tiny_dir))


def engine_of(app):
    return app.state.shoal.engine


def chat_ids(engine, messages):
    text = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_health_is_503_until_loaded_then_200(server):
    base_url, _, loading, not_ready = server
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert not_ready.status_code == 503
    assert not_ready.json()["error"]["code"] == "model_not_ready"
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_models_lists_the_served_model(server):
    base_url, app, _, _ = server
    data = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [(m["id"], m["owned_by"], m["max_model_len"]) for m in data] == [
        ("tiny", "shoal", engine_of(app).max_model_len)
    ]
    assert httpx.get(f"{base_url}/v1/models/tiny").json()["id"] == "tiny"
    missing = httpx.get(f"{base_url}/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_greedy_chat_equals_the_engines_own_output(server, offline):
    base_url, app, _, _ = server
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours of the sea."},
    ]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 24}
    got = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).json()
    prompt = chat_ids(engine_of(app), messages)
    (want,) = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))
    assert got["choices"][0]["message"]["content"] == want.outputs[0].text
    assert got["choices"][0]["finish_reason"] == want.outputs[0].finish_reason
    assert got["usage"]["prompt_tokens"] == len(prompt)
    assert got["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)


def _sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_deltas_concatenate_to_the_full_text(server, endpoint):
    base_url, _, _, _ = server
    common = {"model": "tiny", "temperature": 0, "max_tokens": 20, "ignore_eos": True}
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": "Once upon a time"}
    full = httpx.post(f"{base_url}{path}", json={**common, **body}, timeout=120).json()
    stream_body = {**common, **body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}{path}", json=stream_body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 20
    chunks = events[:-2]
    if endpoint == "chat":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == full["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_n_choices_and_logprobs(server):
    base_url, app, _, _ = server
    body = {
        "model": "tiny",
        "prompt": "The sea",
        "n": 3,
        "max_tokens": 6,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": 3,
        "logprobs": 2,
    }
    got = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).json()
    assert sorted(c["index"] for c in got["choices"]) == [0, 1, 2]
    assert got["usage"]["completion_tokens"] == 18
    for choice in got["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 6
        assert all(len(top) <= 2 for top in lp["top_logprobs"])
        assert all(x <= 0.0 for x in lp["token_logprobs"])
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 4,
        "ignore_eos": True,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    got = httpx.post(f"{base_url}/v1/chat/completions", json=chat, timeout=120).json()
    content = got["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)


def test_stop_string_ends_the_text_before_it(server, offline):
    base_url, app, _, _ = server
    prompt = "Once upon a time"
    ids = engine_of(app).tokenizer(prompt)["input_ids"]
    (free,) = offline.generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )
    text = free.outputs[0].text
    stop = text[len(text) // 2 :][:3]  # a piece of what greedy decoding will produce
    if not stop.strip():
        pytest.fail(f"the tiny model's greedy text has no usable stop string: {text!r}")
    body = {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 30, "stop": stop}
    got = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).json()
    assert got["choices"][0]["finish_reason"] == "stop"
    assert got["choices"][0]["text"] == text[: text.index(stop)]


def test_metrics_show_the_series_after_requests(server):
    base_url, _, _, _ = server
    body = {"model": "tiny", "prompt": "metrics", "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).status_code == 200
    text = httpx.get(f"{base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in [
        "shoal_time_to_first_token_seconds",
        "shoal_inter_token_latency_seconds",
        "shoal_e2e_request_latency_seconds",
        "shoal_request_queue_time_seconds",
        "shoal_num_requests_running",
        "shoal_num_requests_waiting",
        "shoal_kv_cache_usage_ratio",
        "shoal_prompt_tokens",
        "shoal_generation_tokens",
        "shoal_num_preemptions",
        "shoal_prefix_cache_hits",
        "shoal_prefix_cache_queries",
    ]:
        assert name in families, name
        for sample in families[name].samples:
            assert sample.labels["model"] == "tiny" and sample.labels["pool"] == "test-pool"

    def value(sample_name):
        samples = (s for f in families.values() for s in f.samples)
        return next(s.value for s in samples if s.name == sample_name)

    assert value("shoal_time_to_first_token_seconds_count") >= 1
    assert value("shoal_request_queue_time_seconds_count") >= 1
    assert value("shoal_inter_token_latency_seconds_count") >= 2  # 3 tokens: 2 gaps
    assert value("shoal_e2e_request_latency_seconds_count") >= 1
    assert value("shoal_generation_tokens_total") >= 3
    assert value("shoal_prompt_tokens_total") >= 1
    assert value("shoal_prefix_cache_queries_total") >= 1


def test_disconnect_mid_stream_frees_the_request(server):
    base_url, app, _, _ = server
    engine = engine_of(app)
    before = engine.stats().generation_tokens_total
    max_tokens = 240
    body = {
        "model": "tiny",
        "prompt": [5, 6, 7],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        seen = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data")]
        assert seen  # tokens were flowing
        assert engine.stats().num_running == 1
    # the connection is closed: the server must abort the request and free its blocks
    deadline = time.monotonic() + 60
    while engine.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.generation_tokens_total - before < max_tokens  # it did not run to the end


def test_token_bytes_rebuild_split_characters():
    from shoal.runtime.server.tokens import piece_bytes

    # byte-level BPE: "é" is two bytes, spelled "Ã" "©"; "Ġ" stands for a space
    assert piece_bytes("Ã") + piece_bytes("©") == "é".encode()
    assert piece_bytes("Ġw") == b" w"
    # SentencePiece: "▁" is a space, <0xE2> a raw byte
    assert piece_bytes("\u2581hello") == b" hello"
    assert piece_bytes("<0xE2>") == b"\xe2"


def test_disconnect_during_a_non_streaming_request_aborts_it(server):
    import socket
    from urllib.parse import urlparse

    base_url, app, _, _ = server
    engine = engine_of(app)
    before = engine.stats().generation_tokens_total
    max_tokens = 240
    body = json.dumps(
        {"model": "tiny", "prompt": [9, 10, 11], "max_tokens": max_tokens, "ignore_eos": True}
    ).encode()
    url = urlparse(base_url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while engine.stats().generation_tokens_total == before:  # it is generating now
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    # the client is gone before its answer: the server must abort and free the request
    while engine.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.generation_tokens_total - before < max_tokens


def test_health_fails_once_the_engine_loop_stops(tiny_dir):
    """A worker whose step loop died must fail its probe (so Kubernetes restarts it)."""
    import asyncio

    from shoal.runtime.server.local import running_worker

    with running_worker(tiny_config(tiny_dir)) as (base_url, app):
        assert httpx.get(f"{base_url}/health").status_code == 200
        engine = engine_of(app)
        asyncio.run_coroutine_threadsafe(engine.shutdown(), engine._loop).result(60)
        answer = httpx.get(f"{base_url}/health")
        assert answer.status_code == 503 and answer.json()["status"] == "failed"
