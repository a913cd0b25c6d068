"""The LoRA side of the worker's HTTP API, through real uvicorn and the real `openai`
client: adapters as models (/v1/models with parent), the admin API (load, unload, list),
every bad-adapter case answered with its status and code while other adapters keep
serving, and the shoal_lora_* metrics."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from shoal.runtime.config import EngineConfig
from shoal.runtime.testing import make_tiny_adapter

BASE = "tiny"


@pytest.fixture(scope="module")
def adapters(tiny_llama, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-adapters")
    made = {
        "alpha": make_tiny_adapter(tiny_llama, root / "alpha", rank=4, seed=11),
        "beta": make_tiny_adapter(
            tiny_llama, root / "beta", rank=8, target_modules=("o_proj", "down_proj"), seed=12
        ),
        "late": make_tiny_adapter(tiny_llama, root / "late", rank=16, use_rslora=True, seed=13),
        "too-big": make_tiny_adapter(tiny_llama, root / "too-big", rank=32, seed=14),
    }
    other = tiny_model_factory("llama", intermediate_size=96)
    made["other-base"] = make_tiny_adapter(
        other, root / "other-base", target_modules=("gate_proj", "down_proj"), seed=15
    )
    corrupt = root / "corrupt"
    shutil.copytree(made["alpha"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    made["corrupt"] = corrupt
    return made


@pytest.fixture(scope="module")
def worker(tiny_llama, adapters):
    from shoal.runtime.server.local import running_worker

    config = EngineConfig(
        model=str(tiny_llama),
        served_model_name=BASE,
        dtype="float32",
        device="cpu",
        max_model_len=256,
        num_kv_blocks=128,
        lora_modules={"alpha": str(adapters["alpha"]), "beta": str(adapters["beta"])},
        max_loras=2,
    )
    with running_worker(config, pool="p1") as (base_url, _):
        yield base_url


@pytest.fixture
def client(worker):
    with openai.OpenAI(base_url=f"{worker}/v1", api_key="none", max_retries=0) as c:
        yield c


def complete(client, model: str, prompt: str = "Once upon a time") -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert out.model == model
    return out.choices[0].text


def admin(worker: str, path: str, body: dict | None = None) -> httpx.Response:
    if body is None:
        return httpx.get(f"{worker}{path}", timeout=30)
    return httpx.post(f"{worker}{path}", json=body, timeout=30)


def test_models_lists_adapters_with_their_parent(client, adapters):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {BASE, "alpha", "beta"}
    assert models["alpha"].parent == BASE
    assert models["alpha"].root == str(adapters["alpha"])
    assert models[BASE].parent is None
    assert client.models.retrieve("beta").parent == BASE


def test_each_adapter_is_a_model(client):
    texts = {name: complete(client, name) for name in (BASE, "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts  # three different models answered
    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == "alpha"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "no-such-adapter")
    assert err.value.code == "model_not_found"


def test_load_use_list_unload(worker, client, adapters):
    path = str(adapters["late"])
    first = admin(worker, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": path})
    assert first.status_code == 200, first.text
    assert first.json() == {"lora_name": "late", "status": "loaded"}
    again = admin(worker, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": path})
    assert again.status_code == 200  # idempotent for the same path
    late_text = complete(client, "late")
    assert late_text != complete(client, BASE)
    listed = {a["name"]: a for a in admin(worker, "/v1/lora_adapters").json()["data"]}
    assert listed["late"]["rank"] == 16 and listed["late"]["path"] == path
    assert set(listed["late"]) == {"name", "path", "rank", "resident", "running"}
    assert any(a["resident"] for a in listed.values())
    gone = admin(worker, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    unknown = admin(worker, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("too-big", 400, "lora_rank_too_large"),
        ("other-base", 400, "lora_base_mismatch"),
        ("corrupt", 400, "lora_invalid"),
        ("missing", 404, "lora_not_found"),
    ],
)
def test_bad_adapters_fail_with_a_reason_and_others_keep_serving(
    worker, client, adapters, tmp_path, case, status, code
):
    before = complete(client, "alpha")
    path = str(adapters.get(case, tmp_path / "nothing-here"))
    answer = admin(worker, "/v1/load_lora_adapter", {"lora_name": case, "lora_path": path})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert case in error["message"] and "\n" not in error["message"]
    assert "Traceback" not in answer.text
    names = {a["name"] for a in admin(worker, "/v1/lora_adapters").json()["data"]}
    assert case not in names
    assert complete(client, "alpha") == before  # the others are unaffected


def test_admin_rejects_malformed_bodies(worker):
    answer = admin(worker, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "lora_path"
    taken = admin(worker, "/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": "/tmp"})
    assert taken.status_code == 400


def test_metrics(worker, client):
    from prometheus_client.parser import text_string_to_metric_families

    complete(client, "beta")
    text = httpx.get(f"{worker}/metrics", timeout=30).text
    samples = {
        (s.name, s.labels.get("adapter")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("shoal_lora_")
        and s.labels.get("model") == BASE
        and s.labels.get("pool") == "p1"
    }
    assert samples[("shoal_lora_requests_total", "beta")] >= 1
    assert samples[("shoal_lora_generation_tokens_total", "beta")] >= 8
    assert samples[("shoal_lora_prompt_tokens_total", "beta")] >= 1
    assert samples[("shoal_lora_requests_running", "beta")] == 0
    assert 1 <= samples[("shoal_lora_adapters_resident", None)] <= 2
    assert samples[("shoal_lora_adapters_cpu_cached", None)] >= 2
    assert samples[("shoal_lora_loads_total", None)] >= 2
    assert samples[("shoal_lora_evictions_total", None)] >= 0
    assert samples[("shoal_lora_swap_seconds_count", None)] >= 2
