"""Drain by migration on the local cluster: scale-in and a drain asked by hand move running
requests to the survivor, and clients streaming through the gateway never notice.

The operator and the gateway run as local processes watching one namespace; workers are real
`shoal serve` pods (node agent) on a tiny Llama, with their gRPC migration service on.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client as k8s

from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

WORKER_TIMEOUT = 240.0  # a worker imports torch and loads the model on 2 shared cores
MDEP, MODEL = "mig", "tiny-mig"
NAMESPACE = "migration-e2e"
N_REQUESTS = 16
MAX_TOKENS = 1200  # the tiny model makes ~200 tokens/s per request: seconds of streaming
GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"


@pytest.fixture(scope="module")
def pool_namespace(cluster) -> Iterator[str]:
    cluster.create_namespace(NAMESPACE)
    yield NAMESPACE
    cluster.core.delete_namespace(NAMESPACE)


@pytest.fixture(scope="module")
def operator(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[ShoalProcess]:
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    metrics = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    op = ShoalProcess(
        ["operator", "--kubeconfig", str(cluster.kubeconfig), "--namespace", pool_namespace,
         "--liveness", liveness, "--metrics", metrics, "--standalone"],
        tmp_path_factory.mktemp("operator") / "operator.log",
        env,
    )  # fmt: skip
    op.metrics = metrics  # type: ignore[attr-defined]
    try:
        cluster.wait_for("the operator's liveness endpoint", lambda: op.get(liveness) == 200)
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-5000:]}")


@pytest.fixture(scope="module")
def gateway(cluster, crds, pool_namespace, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = ShoalProcess(
        ["gateway", "--kubeconfig", str(cluster.kubeconfig), "--namespace", pool_namespace,
         "--host", "127.0.0.1", "--port", str(port), "--scrape-interval", "0.5"],
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )  # fmt: skip
    try:
        cluster.wait_for("the gateway's /health", lambda: gw.get(f"{url}/health") == 200)
        yield url
    finally:
        gw.stop()
        print(f"--- gateway log (tail) ---\n{gw.log()[-3000:]}")


def apply_pool(cluster, namespace: str, source: str, replicas: int) -> None:
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": MDEP},
        "spec": {
            "model": {"name": MODEL, "source": source},
            "replicas": replicas,
            "runtime": {"engine": {"numKvBlocks": 2048, "maxNumSeqs": 16}},
            "migration": {"drainOnScaleIn": True, "drainTimeoutSeconds": 120},
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


@pytest.fixture(scope="module")
def pool(cluster, operator, gateway, pool_namespace, tiny_model) -> Iterator[str]:
    apply_pool(cluster, pool_namespace, tiny_model, replicas=2)
    wait_pool(cluster, pool_namespace, 2)
    yield MDEP
    cluster.kubectl("delete", "mdep", MDEP, "-n", pool_namespace, "--wait=false", check=False)


# -- helpers --------------------------------------------------------------------------------


def pods(cluster, namespace: str) -> list[k8s.V1Pod]:
    items = cluster.core.list_namespaced_pod(
        namespace, label_selector=f"shoal.dev/deployment={MDEP}"
    ).items
    return [p for p in items if p.metadata.deletion_timestamp is None]


def ready(p: k8s.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def wait_pool(cluster, namespace: str, n: int) -> list[str]:
    def done():
        ps = pods(cluster, namespace)
        if len(ps) == n and all(ready(p) for p in ps):
            return sorted(p.metadata.name for p in ps)
        return None

    return cluster.wait_for(f"{n} ready workers", done, timeout=WORKER_TIMEOUT)


def get_mdep(cluster, namespace: str) -> dict[str, Any]:
    api = k8s.CustomObjectsApi(cluster.api_client)
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, MDEP)


def events(cluster, namespace: str) -> list[str]:
    out = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={MDEP}")
    return [f"{e.reason}: {e.message}" for e in out.items]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Story {i}: tell me about ship number {i * 7 + 3}."}]


def stream_one(gateway: str, i: int, first_token: threading.Event | None = None) -> str:
    """One greedy streaming chat through the gateway; the whole text, or it raises."""
    c = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=300)
    stream = c.chat.completions.create(
        model=MODEL,
        messages=prompt(i),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            if first_token is not None and parts[-1]:
                first_token.set()
    assert finish == "length", f"request {i} ended with {finish!r}"
    return "".join(parts)


def run_all(gateway: str, during=None) -> tuple[dict[int, str], dict[int, str]]:
    """Stream all requests at once; `during()` runs once every stream has its first token."""
    outputs: dict[int, str] = {}
    errors: dict[int, str] = {}
    started = [threading.Event() for _ in range(N_REQUESTS)]

    def one(i: int) -> None:
        try:
            outputs[i] = stream_one(gateway, i, started[i])
        except Exception as e:  # every failure counts: the test asserts there are none
            errors[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    if during is not None:
        for e in started:
            e.wait(timeout=120)
        during()
    for t in threads:
        t.join(timeout=600)
    return outputs, errors


def operator_metric(op: ShoalProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"http://{op.metrics}/metrics", trust_env=False).text  # type: ignore[attr-defined]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def migrated_from_events(said: list[str]) -> int:
    return sum(
        int(m.group(1))
        for e in said
        if (m := re.search(r"MigratedRequests: .* migrated (\d+) request", e))
    )


# -- tests ----------------------------------------------------------------------------------


def test_scale_in_mid_stream_drains_by_migration(cluster, operator, gateway, pool, pool_namespace):
    reference, errors = run_all(gateway)  # unmigrated: both workers serve, nothing moves
    assert errors == {}
    assert len(reference) == N_REQUESTS

    before = wait_pool(cluster, pool_namespace, 2)

    def scale_in() -> None:
        cluster.kubectl("scale", "mdep", MDEP, "-n", pool_namespace, "--replicas=1")

    t0 = time.monotonic()
    outputs, errors = run_all(gateway, during=scale_in)
    streamed_s = time.monotonic() - t0

    assert errors == {}, errors  # zero client errors
    assert outputs == reference  # token-exact: greedy output as if nothing had moved
    (survivor,) = wait_pool(cluster, pool_namespace, 1)
    (victim,) = set(before) - {survivor}
    assert victim not in {p.metadata.name for p in pods(cluster, pool_namespace)}

    status = get_mdep(cluster, pool_namespace)["status"]
    last = status["drain"]["last"]
    assert (last["worker"], last["reason"], last["outcome"]) == (victim, "ScaleDown", "Drained")
    assert status["drain"]["active"] == []
    said = events(cluster, pool_namespace)
    assert any(e.startswith(f"DrainStarted: draining worker {victim}") for e in said), said
    moved = migrated_from_events(said)
    assert moved >= 1, said  # requests really moved (they did not just finish in place)
    assert operator_metric(operator, "shoal_operator_drains_total", outcome="Drained") == 1
    succeeded = operator_metric(
        operator, "shoal_operator_migrations_total", trigger="drain", outcome="succeeded"
    )
    assert succeeded == moved
    print(f"scale-in mid-stream: {moved} request(s) migrated; streams took {streamed_s:.1f}s")


def test_drain_by_hand_replaces_the_worker(cluster, operator, gateway, pool, pool_namespace):
    (only,) = wait_pool(cluster, pool_namespace, 1)
    cluster.kubectl("annotate", "pod", only, "-n", pool_namespace, "shoal.dev/drain=true")

    def replaced():
        names = [p.metadata.name for p in pods(cluster, pool_namespace)]
        ok = only not in names and len(names) == 1 and all(map(ready, pods(cluster, pool_namespace)))
        return names if ok else None

    # Alone in its pool, it keeps serving until its replacement is ready, then drains to it.
    cluster.wait_for("the hand-drained worker to be replaced", replaced, timeout=WORKER_TIMEOUT)
    last = get_mdep(cluster, pool_namespace)["status"]["drain"]["last"]
    assert (last["worker"], last["reason"], last["outcome"]) == (only, "Manual", "Drained")
    assert stream_one(gateway, 0)  # the replacement serves
