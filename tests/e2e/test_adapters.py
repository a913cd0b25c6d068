"""Adapters on the local cluster: declared in a ModelDeployment, placed by the operator,
routed by the gateway, re-placed after a scale-out (slow tier).

One pool of a tiny Llama with three good adapters (replicas 1, 2 and "all") and one whose
rank is above the workers' --max-lora-rank. The operator and the gateway run as local
processes watching one namespace; workers are real `shoal serve` pods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

WORKER_TIMEOUT = 300.0  # a worker imports torch and loads the model on 2 shared cores
NAMESPACE, MDEP, MODEL = "adapters-e2e", "lora", "tiny-lora-base"
GOOD = {"one": 1, "two": 2, "every": "all"}
BAD = "too-big"  # rank 64 > the worker's default --max-lora-rank 16
MESSAGES = [{"role": "user", "content": "Tell me about the tides."}]
GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"


@pytest.fixture(scope="module")
def pool_namespace(cluster) -> Iterator[str]:
    cluster.create_namespace(NAMESPACE)
    yield NAMESPACE
    cluster.core.delete_namespace(NAMESPACE)


def _process(cluster, argv: list[str], log_path: Path) -> ShoalProcess:
    return ShoalProcess([*argv, "--kubeconfig", str(cluster.kubeconfig)], log_path)


@pytest.fixture(scope="module")
def operator(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[ShoalProcess]:
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    op = _process(
        cluster, ["operator", "--namespace", pool_namespace, "--liveness", liveness], log_path
    )
    try:
        cluster.wait_for("the operator's liveness endpoint", lambda: op.get(liveness) == 200)
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-4000:]}")


@pytest.fixture(scope="module")
def gateway(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["gateway", "--namespace", pool_namespace, "--port", str(port)]
    gw = _process(
        cluster, [*argv, "--scrape-interval", "0.5"], tmp_path_factory.mktemp("gw") / "gw.log"
    )
    try:
        cluster.wait_for("the gateway's /health", lambda: gw.get(f"{url}/health") == 200)
        yield url
    finally:
        gw.stop()
        print(f"--- gateway log (tail) ---\n{gw.log()[-4000:]}")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model, tmp_path_factory) -> dict[str, str]:
    from shoal.runtime.testing.adapters import make_tiny_adapter

    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: str(make_tiny_adapter(tiny_model, root / name, rank=8, seed=i))
        for i, name in enumerate(GOOD)
    }
    dirs[BAD] = str(make_tiny_adapter(tiny_model, root / BAD, rank=64, seed=9))
    return dirs


@pytest.fixture(scope="module")
def pool(cluster, operator, gateway, pool_namespace, tiny_model, adapter_dirs) -> Iterator[str]:
    adapters = [
        {"name": name, "source": adapter_dirs[name], "replicas": replicas}
        for name, replicas in [*GOOD.items(), (BAD, 1)]
    ]
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": MDEP},
        "spec": {
            "model": {"name": MODEL, "source": tiny_model},
            "replicas": 2,
            "runtime": {"engine": {"numKvBlocks": 64, "maxNumSeqs": 8}},
            "adapters": adapters,
        },
    }
    cluster.kubectl("apply", "-n", pool_namespace, "-f", "-", input=json.dumps(manifest))
    yield MDEP
    cluster.kubectl("delete", "mdep", MDEP, "-n", pool_namespace, "--wait=false", check=False)


def status(cluster, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "mdep", MDEP, "-n", namespace, "-o", "json")
    return json.loads(out).get("status") or {}


def adapters_by_name(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in st.get("adapters") or []}


def placed(cluster, namespace: str, n_workers: int) -> dict[str, dict[str, Any]] | None:
    """status.adapters once every good adapter is Ready on its share of `n_workers`."""
    st = status(cluster, namespace)
    if st.get("readyReplicas") != n_workers:
        return None
    by = adapters_by_name(st)
    want = {"one": 1, "two": min(2, n_workers), "every": n_workers}
    for name, n in want.items():
        entry = by.get(name) or {}
        # At least: the old end of a move stays loaded for a grace period before it goes.
        if entry.get("state") != "Ready" or len(entry.get("workers") or []) < n:
            return None
    return by


def adapter_workers_seen(gateway: str, adapter: str) -> float:
    text = httpx.get(f"{gateway}/metrics", trust_env=False).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shoal_gateway_adapter_workers" and s.labels.get("adapter") == adapter:
                return s.value
    return 0.0


def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def chat(gateway: str, model: str) -> tuple[str, str]:
    """(answer, the worker pod that served it) for one greedy chat through the gateway."""
    raw = client(gateway).chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-shoal-worker"]


def test_adapters_placed_served_and_replaced_after_scale_out(
    cluster, gateway, pool, pool_namespace
):
    by = cluster.wait_for(
        "2 workers with adapters one/two/every placed 1/2/2",
        lambda: placed(cluster, pool_namespace, 2),
        timeout=WORKER_TIMEOUT,
    )
    first_workers = set(by["every"]["workers"])
    assert set(by["two"]["workers"]) == first_workers
    assert len(by["one"]["workers"]) == 1

    # The bad adapter fails with the worker's reason; the others are unaffected.
    bad = cluster.wait_for(
        "the bad adapter's failure in status",
        lambda: (
            adapters_by_name(status(cluster, pool_namespace)).get(BAD, {}).get("state") == "Failed"
            and adapters_by_name(status(cluster, pool_namespace))[BAD]
        ),
    )
    assert bad["reason"] == "LoraRankTooLarge", bad
    assert "rank" in bad["message"]
    cond = next(
        c for c in status(cluster, pool_namespace)["conditions"] if c["type"] == "AdaptersReady"
    )
    assert (cond["status"], cond["reason"]) == ("False", "AdapterLoadFailed")
    assert BAD in cond["message"]

    # Each adapter is a model of the base pool, served by a worker that holds it.
    models = {m.id: m for m in client(gateway).models.list()}
    for name in GOOD:
        assert (models[name].model_extra or {}).get("parent") == MODEL
    base_answer, _ = chat(gateway, MODEL)
    answers = {}
    for name in GOOD:
        # The gateway learns holders from its scrape of the workers (every 0.5 s).
        cluster.wait_for(
            f"the gateway to see {name} on its holders",
            lambda n=name: adapter_workers_seen(gateway, n) == len(by[n]["workers"]),
        )
        answer, worker = chat(gateway, name)
        assert answer
        assert worker in by[name]["workers"], (name, worker, by[name])
        answers[name] = answer
    # Random (init_lora_weights=False) adapters move greedy output off the base model's.
    assert any(a != base_answer for a in answers.values()), (base_answer, answers)

    with pytest.raises(openai.NotFoundError) as err:
        client(gateway).chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(model=BAD, messages=MESSAGES, max_tokens=4)
    assert err.value.code == "lora_rank_too_large"

    # Scale out: the new worker gets the "all" adapter and serves its requests.
    cluster.kubectl("scale", "mdep", MDEP, "-n", pool_namespace, "--replicas=3")
    by = cluster.wait_for(
        "3 workers with adapters one/two/every placed 1/2/3",
        lambda: placed(cluster, pool_namespace, 3),
        timeout=WORKER_TIMEOUT,
    )
    (new_worker,) = set(by["every"]["workers"]) - first_workers
    cluster.wait_for(
        "the gateway to see every on 3 workers",
        lambda: adapter_workers_seen(gateway, "every") == 3,
    )
    served = set()
    for _ in range(12):
        answer, worker = chat(gateway, "every")
        assert answer == answers["every"]  # same adapter, same greedy tokens on any worker
        served.add(worker)
        if new_worker in served:
            break
    assert new_worker in served, (new_worker, served)


def test_a_dead_workers_adapter_moves_to_a_survivor(cluster, gateway, pool, pool_namespace):
    """Runs after the scale-out above (3 workers): the only holder of `one` goes away."""
    by = adapters_by_name(status(cluster, pool_namespace))
    (victim,) = by["one"]["workers"]
    cluster.kubectl("delete", "pod", victim, "-n", pool_namespace, "--wait=false")

    def moved() -> list[str] | None:
        entry = adapters_by_name(status(cluster, pool_namespace)).get("one") or {}
        holders = entry.get("workers") or []
        ok = entry.get("state") == "Ready" and holders and victim not in holders
        return holders if ok else None

    holders = cluster.wait_for("adapter one on a surviving worker", moved, timeout=60)
    cluster.wait_for(
        "the gateway to see one's new holder",
        lambda: adapter_workers_seen(gateway, "one") >= 1,
    )
    answer, worker = chat(gateway, "one")
    assert answer and worker != victim
    assert worker in holders or worker in (moved() or []), (worker, holders)
