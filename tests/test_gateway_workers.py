"""The gateway in front of real `shoal serve` workers, driven by the real `openai` client.

Two workers serve the same tiny Llama; gateways run as `shoal gateway --static ...`
processes, exactly as a person would start them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

SHOAL = str(Path(sys.executable).parent / "shoal")
MODEL = "tiny"
LONG = 8000  # max_tokens of a request meant to run for seconds
START_DEADLINE_S = 300  # a deadline to give up on a process, not a performance assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A `shoal` subprocess with its log in a file, waited for on its /health."""

    def __init__(self, args: list[str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SHOAL, *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_healthy(self) -> Process:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.log.name} not healthy in time:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from shoal.runtime.testing import make_tiny_model

    # A long context, so that one request can stay running for seconds (the tiny model
    # writes ~1500 tokens/s): the busy-worker and disconnect tests need a request that is
    # still running when they look.
    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=LONG + 64
    )


@pytest.fixture(scope="module")
def workers(model_dir, tmp_path_factory) -> Iterator[list[Process]]:
    logs = tmp_path_factory.mktemp("worker-logs")
    procs = [
        Process(
            [
                "serve",
                "--model",
                str(model_dir),
                "--served-model-name",
                MODEL,
                "--num-kv-blocks",
                str(2 * (LONG + 64) // 16 + 64),  # room for a long request and others
            ],
            logs / f"worker{i}.log",
            free_port(),
        )
        for i in range(2)
    ]
    try:
        yield [p.wait_healthy() for p in procs]
    finally:
        for p in procs:
            p.stop()


def start_gateway(tmp_path: Path, *static: str) -> Process:
    args = ["gateway", "--scrape-interval", "0.5"]
    for item in static:
        args += ["--static", item]
    return Process(args, tmp_path / f"gateway-{free_port()}.log", free_port()).wait_healthy()


@pytest.fixture(scope="module")
def gateway(workers, tmp_path_factory) -> Iterator[Process]:
    gw = start_gateway(tmp_path_factory.mktemp("gw"), f"{MODEL}={workers[0].url},{workers[1].url}")
    yield gw
    gw.stop()


def client_for(url: str) -> openai.OpenAI:
    # max_retries=0: any retry seen must be the gateway's, not the SDK's
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


MESSAGES = [{"role": "user", "content": "Tell me about shoals of fish."}]


def test_models_lists_the_pool(gateway):
    assert [m.id for m in client_for(gateway.url).models.list()] == [MODEL]


def test_chat_completion_equals_the_workers_own_answer(gateway, workers):
    direct = client_for(workers[0].url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    proxied = client_for(gateway.url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage.completion_tokens == direct.usage.completion_tokens > 0


def test_streaming_passes_every_chunk_through(gateway):
    client = client_for(gateway.url)
    whole = client.completions.create(model=MODEL, prompt="The sea", max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="The sea", max_tokens=16, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) > 1  # streamed token by token, not one buffered blob
    assert text == whole.choices[0].text
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_equal_workers_share_the_traffic(gateway, workers):
    client = client_for(gateway.url)
    both = {workers[0].url, workers[1].url}
    served_by = set()
    # Routing is by load, not a fixed order: keep asking until both answered (or give up).
    # The workers' own load is scraped about once a second, and a snapshot taken while
    # one was busy can steer a quick burst to the other, so the asks span a few scrapes.
    for _ in range(50):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="hi", max_tokens=2, temperature=0
        )
        served_by.add(raw.headers["x-shoal-worker"])
        if served_by == both:
            break
        time.sleep(0.1)
    assert served_by == both


def test_a_busy_worker_gets_no_new_requests_while_another_is_idle(gateway, workers):
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": LONG, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/completions", json={**body, "stream": True}
    ) as long_one:
        busy = long_one.headers["x-shoal-worker"]
        chunks = long_one.iter_raw()  # kept: a dropped iterator closes the stream
        next(chunks)  # it is running now
        idle = ({w.url for w in workers} - {busy}).pop()
        served = set()
        for _ in range(3):
            raw = client_for(gateway.url).completions.with_raw_response.create(
                model=MODEL, prompt="hi", max_tokens=2
            )
            served.add(raw.headers["x-shoal-worker"])
        assert served == {idle}
        assert metric(busy, "shoal_num_requests_running") == 1  # still busy all along


def test_worker_4xx_passes_through_unchanged(gateway, workers):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 0}
    direct = httpx.post(f"{workers[0].url}/v1/completions", json=body)
    proxied = httpx.post(f"{gateway.url}/v1/completions", json=body)
    assert 400 <= direct.status_code < 500
    assert (proxied.status_code, proxied.json()) == (direct.status_code, direct.json())
    assert proxied.headers["x-shoal-worker"] in {w.url for w in workers}


def test_gateway_metrics(gateway):
    client_for(gateway.url).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert metric(gateway.url, "shoal_gateway_requests_total", model=MODEL, code="200") >= 1
    assert metric(gateway.url, "shoal_gateway_request_latency_seconds_count", model=MODEL) >= 1
    assert metric(gateway.url, "shoal_gateway_ready_workers", model=MODEL) == 2


def test_stream_is_relayed_live_and_a_disconnect_aborts_it(gateway, workers):
    max_tokens = LONG
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,  # so only an abort can end it early
        "stream": True,
    }
    before = {w.url: metric(w.url, "shoal_generation_tokens_total") for w in workers}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body) as response:
        worker = response.headers["x-shoal-worker"]
        chunks = response.iter_raw()
        for _ in range(3):
            assert next(chunks).startswith(b"data: ")
        # Chunks reach the client while the worker is still generating: nothing buffered.
        assert metric(worker, "shoal_num_requests_running") == 1
    # The client is gone: the gateway must close its upstream stream, and the worker abort.
    deadline = time.monotonic() + 60
    while metric(worker, "shoal_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(worker, "shoal_num_requests_running") == 0
    assert metric(worker, "shoal_generation_tokens_total") - before[worker] < max_tokens


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_refused_worker_is_retried_on_another(workers, tmp_path, stream):
    # The dead worker is listed first: with equal load it is tried first.
    gw = start_gateway(tmp_path, f"{MODEL}={dead_url()},{workers[0].url}")
    try:
        client = client_for(gw.url)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=stream
        )
        assert raw.headers["x-shoal-worker"] == workers[0].url
        result = raw.parse()
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
        else:
            text = result.choices[0].message.content
        assert text
        assert metric(gw.url, "shoal_gateway_upstream_retries_total", model=MODEL) == 1
        # the refusing worker is now tried last: the next request needs no retry
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert metric(gw.url, "shoal_gateway_upstream_retries_total", model=MODEL) == 1
    finally:
        gw.stop()


def test_worker_5xx_is_retried_on_another(workers, tmp_path):
    # A real 5xx source: a second gateway whose only worker is down answers 502.
    broken = start_gateway(tmp_path, f"{MODEL}={dead_url()}")
    gw = start_gateway(tmp_path, f"{MODEL}={broken.url},{workers[0].url}")
    try:
        raw = client_for(gw.url).completions.with_raw_response.create(
            model=MODEL, prompt="hi", max_tokens=4, temperature=0
        )
        assert raw.headers["x-shoal-worker"] == workers[0].url
        assert raw.parse().choices[0].text is not None
        assert metric(gw.url, "shoal_gateway_upstream_retries_total", model=MODEL) == 1
        assert metric(broken.url, "shoal_gateway_requests_total", model=MODEL, code="502") == 1
    finally:
        gw.stop()
        broken.stop()
