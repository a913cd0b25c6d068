"""The gateway on the local cluster: discovery through the API, serving through churn.

The operator and the gateway run as local processes (the same commands the chart's pods
run), watching one test namespace; workers are real `shoal serve` pods started by the
node agent on a tiny Llama built locally.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

WORKER_TIMEOUT = 240.0  # a worker imports torch and loads the model on 2 shared cores
MDEP, MODEL = "chat", "tiny-chat"
MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def pool_namespace(cluster) -> Iterator[str]:
    # One namespace for the module: the operator and the gateway are scoped to it.
    name = "gateway-e2e"
    cluster.create_namespace(name)
    yield name
    cluster.core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[ShoalProcess]:
    port = free_port()
    liveness = f"http://127.0.0.1:{port}/healthz"
    op = ShoalProcess(
        [
            "operator",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--namespace",
            pool_namespace,
            "--liveness",
            liveness,
        ],
        tmp_path_factory.mktemp("operator") / "operator.log",
    )
    try:
        cluster.wait_for("the operator's liveness endpoint", lambda: op.get(liveness) == 200)
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-3000:]}")


@pytest.fixture(scope="module")
def gateway(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = ShoalProcess(
        [
            "gateway",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--namespace",
            pool_namespace,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--scrape-interval",
            "0.5",
        ],
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    try:
        cluster.wait_for("the gateway's /health", lambda: gw.get(f"{url}/health") == 200)
        yield url
    finally:
        gw.stop()
        print(f"--- gateway log (tail) ---\n{gw.log()[-3000:]}")


@pytest.fixture(scope="module")
def pool(cluster, operator, gateway, pool_namespace, tiny_model) -> Iterator[str]:
    manifest = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": MDEP},
        "spec": {
            "model": {"name": MODEL, "source": tiny_model},
            "replicas": 2,
            "runtime": {"engine": {"numKvBlocks": 64, "maxNumSeqs": 8}},
        },
    }
    cluster.kubectl("apply", "-n", pool_namespace, "-f", "-", input=json.dumps(manifest))
    cluster.wait_for(
        "2 ready workers behind the gateway",
        lambda: ready_workers_seen(gateway) == 2,
        timeout=WORKER_TIMEOUT,
    )
    yield MDEP
    cluster.kubectl("delete", "mdep", MDEP, "-n", pool_namespace, "--wait=false", check=False)


def ready_workers_seen(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shoal_gateway_ready_workers" and s.labels.get("model") == MODEL:
                return s.value
    return 0.0


def worker_pods(cluster, namespace: str) -> list[dict[str, Any]]:
    pods = cluster.core.list_namespaced_pod(
        namespace, label_selector=f"shoal.dev/deployment={MDEP}"
    ).items
    return [
        {
            "name": p.metadata.name,
            "ready": any(
                c.type == "Ready" and c.status == "True" for c in p.status.conditions or []
            ),
        }
        for p in pods
        if p.metadata.deletion_timestamp is None
    ]


def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def chat(gateway: str) -> str:
    """One chat completion; returns the name of the worker pod that answered."""
    raw = client(gateway).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert raw.parse().choices[0].message.content
    return raw.headers["x-shoal-worker"]


def served_by(gateway: str, expected: set[str], at_most: int = 10) -> set[str]:
    """Workers that answered requests sent until all of `expected` did (or `at_most`).

    Routing is by load, so the order is not fixed; every worker must still get some.
    """
    seen: set[str] = set()
    for _ in range(at_most):
        seen.add(chat(gateway))
        if seen >= expected:
            break
    return seen


def test_models_and_unknown_model(gateway, pool):
    assert [m.id for m in client(gateway).models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_chat_completion_through_the_gateway(cluster, gateway, pool, pool_namespace):
    names = {p["name"] for p in worker_pods(cluster, pool_namespace)}
    assert served_by(gateway, names) == names  # both workers of the pool take requests
    stream = client(gateway).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_draining_worker_gets_no_new_requests(cluster, gateway, pool, pool_namespace):
    drained, kept = sorted(p["name"] for p in worker_pods(cluster, pool_namespace))
    cluster.kubectl("annotate", "pod", drained, "-n", pool_namespace, "shoal.dev/draining=true")
    try:
        cluster.wait_for(
            "the gateway to drop the drained worker", lambda: ready_workers_seen(gateway) == 1
        )
        assert {chat(gateway) for _ in range(4)} == {kept}
    finally:
        cluster.kubectl("annotate", "pod", drained, "-n", pool_namespace, "shoal.dev/draining-")
    cluster.wait_for("the worker to be routable again", lambda: ready_workers_seen(gateway) == 2)


def test_gateway_keeps_serving_while_a_worker_pod_is_replaced(
    cluster, gateway, pool, pool_namespace
):
    before = {p["name"] for p in worker_pods(cluster, pool_namespace)}
    victim = sorted(before)[0]
    cluster.kubectl("delete", "pod", victim, "-n", pool_namespace, "--wait=false")
    answered: list[str] = []
    failures: list[str] = []

    def replaced() -> bool:
        try:  # every request in the meantime must succeed (wait_for would swallow errors)
            answered.append(chat(gateway))
        except Exception as exc:
            failures.append(repr(exc))
        pods = worker_pods(cluster, pool_namespace)
        names = {p["name"] for p in pods}
        return (
            victim not in names
            and len(pods) == 2
            and all(p["ready"] for p in pods)
            and ready_workers_seen(gateway) == 2
        )

    cluster.wait_for("a replacement worker behind the gateway", replaced, timeout=WORKER_TIMEOUT)
    assert failures == [], f"{len(failures)} of {len(answered) + len(failures)} requests failed"
    assert answered
    after = {p["name"] for p in worker_pods(cluster, pool_namespace)}
    newcomer = (after - before).pop()
    # The newcomer serves too: both current workers answer some of the next requests.
    served = served_by(gateway, after)
    assert served == after and newcomer in served
