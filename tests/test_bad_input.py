"""Bad input gets a clear 400/404 with OpenAI's error shape, never a traceback, and never
hurts the engine or the requests around it. Real server, real engine, tiny Llama."""

from __future__ import annotations

import concurrent.futures
import json
import socket

import httpx
import pytest

from shoal.runtime.config import EngineConfig

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    """The session's tiny Llama (tests/conftest.py)."""
    return str(tiny_llama)


@pytest.fixture(scope="module")
def worker(tiny_dir):
    from shoal.runtime.server.local import running_worker

    config = EngineConfig(
        model=tiny_dir,
        served_model_name="tiny",
        dtype="float32",
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=128,
        block_size=16,
        num_kv_blocks=64,
    )
    with running_worker(config) as (base_url, app):
        yield base_url, app


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Hi"}


def chat(**fields):
    return ("/v1/chat/completions", {**CHAT, **fields})


def completion(**fields):
    return ("/v1/completions", {**COMPLETION, **fields})


def without(body, key):
    return {k: v for k, v in body.items() if k != key}


# (id, (path, body), status, param, code, words the message must contain)
CASES = [
    ("missing-model", ("/v1/completions", without(COMPLETION, "model")), 400, "model", "missing_required_parameter", "required"),
    ("missing-prompt", ("/v1/completions", without(COMPLETION, "prompt")), 400, "prompt", "missing_required_parameter", "required"),
    ("missing-messages", ("/v1/chat/completions", without(CHAT, "messages")), 400, "messages", "missing_required_parameter", "required"),
    ("empty-messages", chat(messages=[]), 400, "messages", "invalid_value", "at least 1"),
    ("unknown-model-chat", chat(model="gpt-9"), 404, "model", "model_not_found", "gpt-9"),
    ("unknown-model-completion", completion(model="gpt-9"), 404, "model", "model_not_found", "tiny"),
    ("prompt-too-long", completion(prompt=[5] * (MAX_MODEL_LEN + 10)), 400, "prompt", "context_length_exceeded", "maximum context length"),
    ("prompt-fills-window", completion(prompt=[5] * MAX_MODEL_LEN), 400, "prompt", "context_length_exceeded", "no room"),
    ("prompt-plus-max-tokens", completion(prompt=[5] * 100, max_tokens=50), 400, "max_tokens", "context_length_exceeded", "150"),
    ("chat-too-long", chat(messages=[{"role": "user", "content": "word " * 400}]), 400, "messages", "context_length_exceeded", "maximum context length"),
    ("max-tokens-zero", completion(max_tokens=0), 400, "max_tokens", "invalid_value", "at least 1"),
    ("max-tokens-negative", chat(max_tokens=-5), 400, "max_tokens", "invalid_value", "at least 1"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value", "at least 1"),
    ("n-zero", completion(n=0), 400, "n", "invalid_value", "n must be"),
    ("n-too-large", chat(n=1000), 400, "n", "invalid_value", "n must be"),
    ("temperature-high", chat(temperature=3.5), 400, "temperature", "invalid_value", "[0, 2]"),
    ("temperature-negative", completion(temperature=-1), 400, "temperature", "invalid_value", "temperature"),
    ("top-p-zero", completion(top_p=0), 400, "top_p", "invalid_value", "top_p"),
    ("top-p-high", chat(top_p=1.5), 400, "top_p", "invalid_value", "top_p"),
    ("top-k-zero", completion(top_k=0), 400, "top_k", "invalid_value", "top_k"),
    ("repetition-penalty-zero", chat(repetition_penalty=0), 400, "repetition_penalty", "invalid_value", "repetition_penalty"),
    ("presence-penalty-high", chat(presence_penalty=5), 400, "presence_penalty", "invalid_value", "[-2, 2]"),
    ("frequency-penalty-low", completion(frequency_penalty=-3), 400, "frequency_penalty", "invalid_value", "[-2, 2]"),
    ("logprobs-too-many", completion(logprobs=50), 400, "logprobs", "invalid_value", "logprobs"),
    ("top-logprobs-too-many", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "invalid_value", "top_logprobs must be"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "top_logprobs", None, "logprobs"),
    ("too-many-stops", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value", "at most 4"),
    ("stop-wrong-type", chat(stop=5), 400, "stop", "invalid_value", "string"),
    ("seed-beyond-64-bits", chat(seed=2**70), 400, "seed", "invalid_value", "less than or equal"),
    ("negative-stop-token", completion(stop_token_ids=[-1]), 400, "stop_token_ids", "invalid_value", "non-negative"),
    ("token-out-of-vocab", completion(prompt=[1, 10**9]), 400, "prompt", "invalid_value", "range"),
    ("negative-token", completion(prompt=[-3]), 400, "prompt", "invalid_value", "range"),
    ("batched-prompts", completion(prompt=["a", "b"]), 400, "prompt", "invalid_value", "one prompt per request"),
    ("empty-prompt-list", completion(prompt=[]), 400, "prompt", "invalid_value", "empty"),
    ("prompt-wrong-type", completion(prompt={"text": "x"}), 400, "prompt", "invalid_value", "prompt must be"),
    ("n-not-a-number", completion(n="many"), 400, "n", "invalid_value", "integer"),
    ("bad-role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "invalid_value", "'user'"),
    ("messages-not-a-list", chat(messages="hello"), 400, "messages", "invalid_value", "list"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400, "stream_options", None, "stream"),
    # unsupported fields are named, never silently ignored
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter", "'tools'"),
    ("tool-choice", chat(tool_choice="required"), 400, "tool_choice", "unsupported_parameter", "'tool_choice'"),
    ("functions", chat(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter", "'functions'"),
    ("json-schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format", "unsupported_parameter", "json_schema"),
    ("json-object", chat(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter", "'response_format'"),
    ("suffix", completion(suffix="END"), 400, "suffix", "unsupported_parameter", "'suffix'"),
    ("best-of", completion(best_of=3), 400, "best_of", "unsupported_parameter", "'best_of'"),
    ("echo", completion(echo=True), 400, "echo", "unsupported_parameter", "'echo'"),
    ("logit-bias", completion(logit_bias={"5": 10}), 400, "logit_bias", "unsupported_parameter", "'logit_bias'"),
    ("unknown-field", chat(min_tokens=3), 400, "min_tokens", "unsupported_parameter", "'min_tokens'"),
    ("image-content", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content", "invalid_value", "image_url"),
    ("tool-message", chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, "messages[0]", "unsupported_parameter", "tool"),
    ("unknown-stream-option", chat(stream=True, stream_options={"continuous_usage_stats": True}), 400, "stream_options.continuous_usage_stats", "unsupported_parameter", "continuous_usage_stats"),
]  # fmt: skip


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    return error


@pytest.mark.parametrize(
    ("request_", "status", "param", "code", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_an_openai_error(worker, request_, status, param, code, words):
    base_url, _ = worker
    path, body = request_
    error = assert_openai_error(httpx.post(base_url + path, json=body, timeout=60), status)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert words in error["message"]


@pytest.mark.parametrize(
    "raw", [b'{"model": "tiny", "prompt": ', b"\xff\xfe", b"", b"not json"], ids=repr
)
def test_invalid_json(worker, raw):
    base_url, _ = worker
    response = httpx.post(
        f"{base_url}/v1/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"]
)
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(worker, field, number):
    """Python's json module reads these non-standard literals; the ranges must catch them."""
    base_url, _ = worker
    raw = f'{{"model": "tiny", "prompt": "x", "{field}": {number}}}'
    response = httpx.post(f"{base_url}/v1/completions", content=raw, timeout=60)
    assert assert_openai_error(response, 400)["param"] == field


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, None])
def test_body_must_be_an_object(worker, payload):
    base_url, _ = worker
    response = httpx.post(f"{base_url}/v1/chat/completions", content=json.dumps(payload))
    assert "JSON object" in assert_openai_error(response, 400)["message"]


def test_unknown_route_and_wrong_method(worker):
    base_url, _ = worker
    missing = assert_openai_error(httpx.post(f"{base_url}/v1/embeddings", json={}), 404)
    assert "/v1/embeddings" in missing["message"]
    assert_openai_error(httpx.get(f"{base_url}/v1/completions"), 405)


def test_engine_serves_on_after_bad_input_and_beside_a_dropped_stream(worker):
    """Bad requests and a client dropping its stream leave a concurrent request intact."""
    base_url, app = worker
    good = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": 40, "ignore_eos": True}
    good["temperature"] = 0
    alone = httpx.post(f"{base_url}/v1/completions", json=good, timeout=120).json()

    def dropped_stream():
        body = {**good, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    return  # leave mid-stream

    def bad_requests():
        for _, (path, body), status, *_ in CASES:
            assert httpx.post(base_url + path, json=body, timeout=60).status_code == status

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = pool.submit(
            lambda: httpx.post(f"{base_url}/v1/completions", json=good, timeout=120).json()
        )
        side = [pool.submit(dropped_stream), pool.submit(bad_requests)]
        for f in side:
            f.result()
        result = together.result()
    assert result["choices"][0]["text"] == alone["choices"][0]["text"]
    assert result["usage"]["completion_tokens"] == 40
    after = httpx.post(f"{base_url}/v1/completions", json=good, timeout=120).json()
    assert after["choices"][0]["text"] == alone["choices"][0]["text"]
    assert httpx.get(f"{base_url}/health").status_code == 200


# ------------------------------------------------------------------- the CLI


def serve(argv, capsys):
    from shoal.cli import main

    rc = main(["serve", *argv])
    return rc, capsys.readouterr().err


def test_cli_model_dir_without_config(tmp_path, capsys):
    rc, err = serve(["--model", str(tmp_path)], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        f"error: --model {tmp_path}: no config.json there; pass a Hugging Face model "
        "directory (config.json, *.safetensors, tokenizer files)"
    ]


def test_cli_missing_dir(tmp_path, capsys):
    rc, err = serve(["--model", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such directory" in err and "shoal tiny-model --out" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--kv-cache-memory", "lots"], "not a size"),
        (["--num-kv-blocks", "10", "--kv-cache-memory", "1GiB"], "not allowed with"),
        (["--port", "70000"], "0-65535"),
        (["--max-num-seqs", "0"], "at least 1"),
        (["--dtype", "float8"], "invalid choice"),
    ],
)
def test_cli_bad_flags(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        serve(["--model", str(tmp_path), *argv], capsys)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_port_in_use(tiny_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = serve(["--model", tiny_dir, "--port", str(port)], capsys)
    assert rc == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err


def test_cli_exits_when_the_model_cannot_load(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    rc, err = serve(["--model", str(tmp_path), "--port", "0"], capsys)
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: could not load {tmp_path}: ")
