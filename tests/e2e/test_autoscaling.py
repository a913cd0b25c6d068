"""SLO autoscaling on the real local cluster (slow tier).

The operator reads the cluster's real Prometheus (which scrapes the workers) and scales a
tiny-model pool through the scale subresource; load goes through the real gateway. A burst
must raise the replicas, its end must lower them again without losing a request, and with
Prometheus unreachable the pool must hold its count and say so in a condition.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from bench.autoscale import replay
from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"
WORKER_TIMEOUT = 240.0
NAME, MODEL = "auto", "tiny-auto"
PROMPT = list(range(10, 74))  # 64 prompt tokens


def autoscaling(**over: Any) -> dict[str, Any]:
    spec = {
        "minReplicas": 1,
        "maxReplicas": 3,
        # Tiny on purpose: a queue of a few requests on 2 shared cores breaks it.
        "slo": {"ttft": {"target": 0.15, "percentile": 90}, "tpot": {"target": 0.2}},
        "guards": {"maxWaitingPerReplica": 2},
        "windowSeconds": 10,
        "intervalSeconds": 2,
        "scaleDown": {"stabilizationWindowSeconds": 12},
        "cooldownSeconds": 6,
        "maxStep": 2,
    }
    return {**spec, **over}


@pytest.fixture(scope="module")
def ns(cluster) -> Iterator[str]:
    name = "autoscale-e2e"
    cluster.create_namespace(name)
    yield name
    cluster.core.delete_namespace(name)


def start_operator(cluster, ns: str, log_dir, prometheus_url: str) -> ShoalProcess:
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    op = ShoalProcess(
        [
            "operator", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
            "--standalone", "--liveness", liveness, "--prometheus-url", prometheus_url,
        ],
        log_dir / "operator.log",
    )  # fmt: skip
    cluster.wait_for("the operator's liveness endpoint", lambda: op.get(liveness) == 200)
    return op


@pytest.fixture(scope="module")
def gateway(cluster, crds, ns, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = ShoalProcess(
        [
            "gateway", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
            "--host", "127.0.0.1", "--port", str(port), "--scrape-interval", "0.5",
        ],
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )  # fmt: skip
    try:
        cluster.wait_for("the gateway's /health", lambda: gw.get(f"{url}/health") == 200)
        yield url
    finally:
        gw.stop()
        print(f"--- gateway log (tail) ---\n{gw.log()[-3000:]}")


def mdep(cluster, ns: str) -> dict[str, Any]:
    api = client.CustomObjectsApi(cluster.api_client)
    return api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, NAME)


def ready(cluster, ns: str) -> int:
    return (mdep(cluster, ns).get("status") or {}).get("readyReplicas") or 0


def replicas(cluster, ns: str) -> int:
    return mdep(cluster, ns)["spec"]["replicas"]


def condition(m: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(
        (c for c in (m.get("status") or {}).get("conditions") or [] if c["type"] == type_), {}
    )


def events(cluster, ns: str) -> list[str]:
    out = cluster.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={NAME}")
    return [f"{e.reason}: {e.message}" for e in out.items]


class Trickle:
    """A request every `period` seconds in a thread until stopped; every answer kept."""

    def __init__(self, gateway: str, period: float = 0.5) -> None:
        self.gateway, self.period = gateway, period
        self.records: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.records += asyncio.run(replay(self.gateway, MODEL, [0.0], PROMPT, 8))
            self._stop.wait(self.period)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_burst_scales_up_then_back_down_without_losing_requests(
    cluster, crds, ns, gateway, tiny_model, tmp_path
):
    op = start_operator(cluster, ns, tmp_path, cluster.prometheus_url)
    try:
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME},
            "spec": {
                "model": {"name": MODEL, "source": tiny_model},
                "replicas": 1,
                # Two batch slots per worker: a worker's capacity is its slots, not the
                # speed of this machine's cores, so the burst overloads one worker on a
                # quiet machine as surely as on a busy one.
                "runtime": {"engine": {"numKvBlocks": 128, "maxNumSeqs": 2}},
                "autoscaling": autoscaling(),
            },
        }
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))
        cluster.wait_for("1 ready worker", lambda: ready(cluster, ns) == 1, WORKER_TIMEOUT)
        # Once Prometheus scrapes the worker, the autoscaler reads it and holds the idle pool
        # at its minimum.
        cluster.wait_for(
            "MetricsAvailable=True",
            lambda: condition(mdep(cluster, ns), "MetricsAvailable").get("status") == "True",
            timeout=60,
        )
        assert mdep(cluster, ns)["spec"]["replicas"] == 1

        # One request first: a worker compiles or loads its CPU kernel on its first step
        # (minutes when another build holds the lock), which is no part of this test.
        warm = asyncio.run(replay(gateway, MODEL, [0.0], PROMPT, 4))
        assert [r.error for r in warm if r.error] == []

        # The burst: 20 requests/s for 25 s of 48 tokens each, far above what one worker
        # with two slots serves within a 150 ms TTFT (its queue grows by the second).
        offsets = [i * 0.05 for i in range(500)]
        burst: list = []
        runner = threading.Thread(
            target=lambda: burst.extend(asyncio.run(replay(gateway, MODEL, offsets, PROMPT, 48)))
        )
        runner.start()

        # The scale subresource moves first, then status.autoscaling: wait for both.
        def scaled_up() -> dict[str, Any] | None:
            m = mdep(cluster, ns)
            report = (m.get("status") or {}).get("autoscaling") or {}
            return report if m["spec"]["replicas"] >= 2 and "lastScale" in report else None

        up = cluster.wait_for("a scale-up", scaled_up, timeout=90)
        assert up["lastScale"]["from"] == 1 and up["lastScale"]["to"] >= 2, up
        assert up["lastScale"]["reason"] == "SLOPressure", up
        assert float(up["observed"]["sloPressure"]) > 1.0, up
        cluster.wait_for("a second ready worker", lambda: ready(cluster, ns) >= 2, WORKER_TIMEOUT)
        runner.join(timeout=300)
        assert not runner.is_alive()
        peak = replicas(cluster, ns)
        assert 2 <= peak <= 3
        # Scale-up is not the property under test, and new workers starting on the same two
        # cores can break a stream now and then (reported, not hidden): a few, not many.
        failed = [r.error for r in burst if r.error]
        print(f"burst: {len(burst)} requests, {len(failed)} failed: {sorted(set(failed))[:5]}")
        assert len(failed) <= len(burst) // 20, sorted(set(failed))

        # After the burst, a trickle keeps going while the pool shrinks: nothing may fail.
        with Trickle(gateway) as trickle:
            cluster.wait_for("the scale-in to 1", lambda: replicas(cluster, ns) == 1, timeout=180)
            cluster.wait_for("one worker left", lambda: ready(cluster, ns) == 1, timeout=60)
        assert trickle.records, "the trickle sent nothing"
        assert [r.error for r in trickle.records if r.error] == []
        down = cluster.wait_for(
            "the scale-in in status.autoscaling",
            lambda: (
                report
                if (
                    (report := mdep(cluster, ns)["status"]["autoscaling"]).get("lastScale") or {}
                ).get("to")
                == 1
                else None
            ),
            timeout=30,
        )
        assert down["lastScale"]["to"] == 1 and down["lastScale"]["reason"] == "SLOHolds", down
        said = events(cluster, ns)
        assert any(e.startswith("ScaledUp: 1 -> ") for e in said), said
        assert any(e.startswith("ScaledDown: 2 -> 1") for e in said), said
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-4000:]}")


def test_prometheus_unreachable_holds_the_count_and_says_so(cluster, crds, ns, tmp_path):
    """The same pool, now with an operator whose Prometheus refuses connections: an idle pool
    at 2 replicas would go to 1 if the autoscaler guessed; it must hold 2."""
    cluster.kubectl("scale", "mdep", NAME, "-n", ns, "--replicas=2")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    op = start_operator(cluster, ns, tmp_path, dead)
    try:

        def held() -> dict[str, Any] | None:
            m = mdep(cluster, ns)
            c = condition(m, "MetricsAvailable")
            return m if c.get("reason") == "PrometheusUnavailable" else None

        m = cluster.wait_for("the MetricsAvailable=False condition", held, timeout=60)
        c = condition(m, "MetricsAvailable")
        assert c["status"] == "False" and "cannot reach Prometheus" in c["message"], c
        # Several evaluations later (interval 2 s, cooldown 6 s, down window 12 s): still 2.
        cluster.wait_for(
            "more evaluations",
            lambda: (
                mdep(cluster, ns)["status"]["autoscaling"]["lastEvaluationTime"]
                > m["status"]["autoscaling"]["lastEvaluationTime"]
            ),
            timeout=30,
        )
        time.sleep(15)
        m = mdep(cluster, ns)
        assert m["spec"]["replicas"] == 2
        assert m["status"]["autoscaling"]["reason"] == "MetricsUnavailable"
        assert m["status"]["autoscaling"]["lastDecision"] == "Hold"
        assert any(e.startswith("PrometheusUnavailable:") for e in events(cluster, ns))
    finally:
        op.stop()
        cluster.kubectl("delete", "mdep", NAME, "-n", ns, "--wait=false", check=False)
        print(f"--- operator log (tail) ---\n{op.log()[-3000:]}")
