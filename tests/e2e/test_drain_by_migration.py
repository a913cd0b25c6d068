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

from shoal.operator import migration_client
from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

WORKER_TIMEOUT = 240.0  # a worker imports torch and loads the model on 2 shared cores
MDEP, MODEL = "mig", "tiny-mig"
NAMESPACE = "migration-e2e"
N_REQUESTS = 16
MAX_TOKENS = 1200  # the tiny model makes ~200 tokens/s per request: seconds of streaming
GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"
STAGGER_S = 0.15
SERVED: dict[int, str] = {}  # request -> the worker the gateway first sent it to


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
            # One batch slot per worker: the 8 requests a worker gets run one after the
            # other, so it still has work when a drain lands however fast the machine
            # generates (a quiet one finishes a 1200-token request in about a second;
            # a drain moves the waiting requests too).
            "runtime": {"engine": {"numKvBlocks": 2048, "maxNumSeqs": 1}},
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
    out = cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={MDEP}"
    )
    return [f"{e.reason}: {e.message}" for e in out.items]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Story {i}: tell me about ship number {i * 7 + 3}."}]


def stream_one(gateway: str, i: int) -> str:
    """One greedy streaming chat through the gateway; the whole text, or it raises."""
    c = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=300)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=prompt(i),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    SERVED[i] = raw.headers.get("x-shoal-worker", "?")
    stream = raw.parse()
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", f"request {i} ended with {finish!r}"
    return "".join(parts)


def run_all(gateway: str, during=None) -> tuple[dict[int, str], dict[int, str]]:
    """Stream all requests at once (staggered a little); `during()` runs meanwhile."""
    outputs: dict[int, str] = {}
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            outputs[i] = stream_one(gateway, i)
        except Exception as e:  # every failure counts: the test asserts there are none
            errors[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
        # Spread over a few of the gateway's load scrapes, so both workers get requests
        # (a burst within one scrape may all go to the worker that looked idlest).
        time.sleep(STAGGER_S)
    if during is not None:
        during()
    for t in threads:
        t.join(timeout=600)
    print(f"routed: {sorted(SERVED.items())}")
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


@pytest.fixture(scope="module")
def reference(gateway, pool) -> dict[int, str]:
    """The outputs of every request unmigrated: both workers serve, nothing moves."""
    outputs, errors = run_all(gateway)
    assert errors == {}
    assert len(outputs) == N_REQUESTS
    return outputs


def busiest(namespace: str, cluster, names: list[str]) -> str:
    """The worker with the most requests running now (asked over its gRPC GetLoad)."""
    ips = {p.metadata.name: p.status.pod_ip for p in pods(cluster, namespace)}
    loads = {n: migration_client.get_load(f"{ips[n]}:50051") for n in names}
    return max(names, key=lambda n: (loads[n].num_running if loads[n] else -1, n))


def both_busy(cluster, namespace: str, names: list[str]) -> None:
    """Wait until every worker runs requests: whichever one goes then has some to move."""
    ips = {p.metadata.name: p.status.pod_ip for p in pods(cluster, namespace)}
    running: dict[str, int | None] = {}
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for n in names:
            load = migration_client.get_load(f"{ips[n]}:50051")
            running[n] = load.num_running if load else None
            if load is not None and load.draining:
                running[n] = -1  # says it is draining: it takes nothing new
        seen.append((round(time.monotonic(), 2), dict(running)))
        if all(running.values()):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"the gateway did not spread the requests: {seen[:20]}; first routed to {SERVED}"
    )


def warm_up(cluster, namespace: str) -> None:
    """One short request straight to each worker: a fresh worker's first steps are slow (its
    kernels compile), and a cold worker would skew which requests are still running."""
    for p in pods(cluster, namespace):
        r = httpx.post(
            f"http://{p.status.pod_ip}:8000/v1/completions",
            json={"model": MODEL, "prompt": "warm up", "max_tokens": 4},
            timeout=120,
            trust_env=False,
        )
        r.raise_for_status()


def drained(cluster, operator, namespace: str, victim: str, reason: str, before: dict) -> int:
    """Check what the drain of `victim` left in status, events and metrics; requests moved."""
    status = get_mdep(cluster, namespace)["status"]
    last = status["drain"]["last"]
    assert (last["worker"], last["reason"], last["outcome"]) == (victim, reason, "Drained")
    assert status["drain"]["active"] == []
    said = events(cluster, namespace)
    assert any(e.startswith(f"DrainStarted: draining worker {victim} ({reason})") for e in said)
    moved = migrated_from_events(said) - before["events"]
    assert moved >= 1, said  # requests really moved (they did not just finish in place)
    drains = operator_metric(operator, "shoal_operator_drains_total", outcome="Drained")
    assert drains == before["drains"] + 1
    succeeded = operator_metric(
        operator, "shoal_operator_migrations_total", trigger="drain", outcome="succeeded"
    )
    assert succeeded - before["succeeded"] == moved
    return moved


def counters(cluster, operator, namespace: str) -> dict[str, float]:
    return {
        "events": migrated_from_events(events(cluster, namespace)),
        "drains": operator_metric(operator, "shoal_operator_drains_total", outcome="Drained"),
        "succeeded": operator_metric(
            operator, "shoal_operator_migrations_total", trigger="drain", outcome="succeeded"
        ),
    }


def direct_stream(ip: str, i: int, max_tokens: int) -> None:
    """A long stream straight to one worker (no gateway: nothing balances it). When the
    request is moved the worker ends this stream with its marker; that is all we need."""
    body = {"model": MODEL, "prompt": f"Ship {i} sails", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream(
        "POST", f"http://{ip}:8000/v1/completions", json=body, timeout=300, trust_env=False
    ) as r:
        for _ in r.iter_lines():
            pass


def test_rebalancer_moves_requests_to_the_idle_worker(
    cluster, operator, pool, pool_namespace, reference
):
    busy, idle = wait_pool(cluster, pool_namespace, 2)
    ips = {p.metadata.name: p.status.pod_ip for p in pods(cluster, pool_namespace)}
    rebalance = {"enabled": True, "threshold": 0.05, "hysteresis": 0.02, "cooldownSeconds": 0}
    patch = json.dumps({"spec": {"migration": {"rebalance": rebalance}}})
    cluster.kubectl("patch", "mdep", MDEP, "-n", pool_namespace, "--type=merge", "-p", patch)
    before = operator_metric(
        operator, "shoal_operator_migrations_total", trigger="rebalance", outcome="succeeded"
    )
    threads = [
        threading.Thread(target=direct_stream, args=(ips[busy], i, 1800), daemon=True)
        for i in range(8)
    ]
    for t in threads:
        t.start()
    try:

        def moved():
            st = get_mdep(cluster, pool_namespace).get("status") or {}
            last = (st.get("migration") or {}).get("lastMigration") or {}
            return last if last.get("ok") else None

        last = cluster.wait_for("the rebalancer to move a request", moved, timeout=60)
        assert (last["source"], last["target"]) == (busy, idle)
        after = operator_metric(
            operator, "shoal_operator_migrations_total", trigger="rebalance", outcome="succeeded"
        )
        assert after > before
        assert any(e.startswith("Rebalanced: moved") for e in events(cluster, pool_namespace))
    finally:
        off = json.dumps({"spec": {"migration": {"rebalance": {"enabled": False}}}})
        cluster.kubectl("patch", "mdep", MDEP, "-n", pool_namespace, "--type=merge", "-p", off)
        for t in threads:
            t.join(timeout=120)


def test_drain_by_hand_mid_stream(cluster, operator, gateway, pool, pool_namespace, reference):
    before_pods = wait_pool(cluster, pool_namespace, 2)
    before = counters(cluster, operator, pool_namespace)
    chosen: list[str] = []

    def drain_by_hand() -> None:
        both_busy(cluster, pool_namespace, before_pods)
        chosen.append(busiest(pool_namespace, cluster, before_pods))
        cluster.kubectl("annotate", "pod", chosen[0], "-n", pool_namespace, "shoal.dev/drain=true")

    outputs, errors = run_all(gateway, during=drain_by_hand)
    assert errors == {}, errors
    assert outputs == reference  # token-exact
    # Replaced: replicas stay 2, the drained worker is gone.
    after = wait_pool(cluster, pool_namespace, 2)
    assert chosen[0] not in after
    moved = drained(cluster, operator, pool_namespace, chosen[0], "Manual", before)
    print(f"drain by hand mid-stream: {moved} request(s) migrated")


def test_scale_in_mid_stream_drains_by_migration(
    cluster, operator, gateway, pool, pool_namespace, reference
):
    before_pods = wait_pool(cluster, pool_namespace, 2)
    warm_up(cluster, pool_namespace)  # the hand drain's replacement is new
    before = counters(cluster, operator, pool_namespace)

    def scale_in() -> None:
        both_busy(cluster, pool_namespace, before_pods)
        cluster.kubectl("scale", "mdep", MDEP, "-n", pool_namespace, "--replicas=1")

    t0 = time.monotonic()
    outputs, errors = run_all(gateway, during=scale_in)
    streamed_s = time.monotonic() - t0

    assert errors == {}, errors  # zero client errors
    assert outputs == reference  # token-exact: greedy output as if nothing had moved
    (survivor,) = wait_pool(cluster, pool_namespace, 1)
    (victim,) = set(before_pods) - {survivor}
    assert victim not in {p.metadata.name for p in pods(cluster, pool_namespace)}
    moved = drained(cluster, operator, pool_namespace, victim, "ScaleDown", before)
    print(f"scale-in mid-stream: {moved} request(s) migrated; streams took {streamed_s:.1f}s")
