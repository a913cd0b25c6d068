"""The real `openai` client, sync and async, streaming and not, against a real worker:
uvicorn on 127.0.0.1 with the real engine on a tiny Llama. And `shoal serve` itself, run
as a process, answering the client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import openai
import pytest

from shoal.runtime.config import EngineConfig
from shoal.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    """The session's tiny Llama (tests/conftest.py)."""
    return str(tiny_llama)


def config_for(path: str) -> EngineConfig:
    return EngineConfig(
        model=path,
        served_model_name="tiny",
        dtype="float32",
        device="cpu",
        max_model_len=256,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        block_size=16,
        num_kv_blocks=128,
    )


@pytest.fixture(scope="module")
def worker(tiny_dir):
    from shoal.runtime.server.local import running_worker

    with running_worker(config_for(tiny_dir)) as (base_url, app):
        yield base_url, app


@pytest.fixture(scope="module")
def offline(tiny_dir):
    from shoal.runtime.engine.llm_engine import LLMEngine

    return LLMEngine(config_for(tiny_dir))


@pytest.fixture
def client(worker):
    base_url, _ = worker
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def test_models(client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "shoal"
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_equals_the_engine_and_its_stream(client, worker, offline):
    _, app = worker
    prompt = "In the beginning"
    full = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    ids = app.state.shoal.engine.tokenizer(prompt)["input_ids"]
    (want,) = offline.generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    )
    assert full.choices[0].text == want.outputs[0].text
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(ids), 16)
    assert full.usage.total_tokens == len(ids) + 16

    stream = client.completions.create(
        model="tiny", prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_stream_equals_chat(client):
    messages = [{"role": "user", "content": "Tell me about whales."}]
    full = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 16


def test_sampling_fields_and_seed(client):
    messages = [{"role": "user", "content": "Pick a word."}]
    extra = {"top_k": 20, "repetition_penalty": 1.2, "ignore_eos": True}

    def sample(seed):
        reply = client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=1.0,
            top_p=0.9,
            max_completion_tokens=12,
            seed=seed,
            n=2,
            extra_body=extra,
        )
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(42)
    assert len(first) == 2
    assert sample(42) == first  # a seeded request is reproducible


def test_chat_logprobs(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 16
    # a token may hold part of a UTF-8 character: its bytes rebuild the exact text
    raw = b"".join(bytes(t.bytes) for t in content).decode(errors="replace")
    text = reply.choices[0].message.content
    assert text and raw.startswith(text)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_errors_raise_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert exc.value.param == "max_tokens" and "at least 1" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "'tools' is not supported" in exc.value.message


def test_async_client_concurrent_requests_match_sequential(worker):
    base_url, _ = worker
    prompts = [f"Story number {i}:" for i in range(6)]

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="none", max_retries=0
        ) as client:

            async def plain(p):
                r = await client.completions.create(model="tiny", prompt=p, **GREEDY)
                return r.choices[0].text

            async def streamed(p):
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": p}], stream=True, **GREEDY
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def chat(p):
                r = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": p}], **GREEDY
                )
                return r.choices[0].message.content

            alone = [await plain(p) for p in prompts]
            chats_alone = [await chat(p) for p in prompts]
            # everything at once: continuous batching mixes prefills and decodes
            together = await asyncio.gather(
                *(plain(p) for p in prompts), *(streamed(p) for p in prompts)
            )
            return alone, chats_alone, together

    alone, chats_alone, together = asyncio.run(main())
    assert list(together[: len(prompts)]) == alone
    assert list(together[len(prompts) :]) == chats_alone


# ----------------------------------------------------------- `shoal serve` itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_shoal_serve_answers_the_openai_client(tiny_dir, tmp_path):
    from shoal.runtime.server.local import wait_healthy

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "serve", "--model", tiny_dir, "--port", str(port)]
            + ["--served-model-name", "tiny", "--num-kv-blocks", "64", "--pool", "demo"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout=300)
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hello!"}],
                stream=True,
                **GREEDY,
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream)
            assert text
    finally:
        proc.send_signal(signal.SIGTERM)  # what Kubernetes sends a pod
        rc = proc.wait(60)
    logs = log_path.read_text()
    assert rc == 0, logs
    assert f"listening on http://127.0.0.1:{port}" in logs
    assert "KV cache: 64 blocks" in logs
    assert "model tiny ready" in logs
    assert "Traceback" not in logs
    assert "GET /health" not in logs  # probes do not flood the log
