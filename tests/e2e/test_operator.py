"""The operator on the real local cluster (slow tier).

The operator runs as a local process (`shoal operator`, the same command a pod would run),
with kopf peering on and its liveness endpoint on loopback. Workers run the real runtime
(`shoal serve`) on a tiny Llama built locally, as processes started by the node agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.helpers import ShoalProcess, free_port

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"
WORKER_TIMEOUT = 240.0  # a worker imports torch and loads the model on 2 shared cores
PRIORITY = 100  # the module's operator; the peering test starts a higher one
# Pods and the operator listen on loopback: never through a proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- fixtures -------------------------------------------------------------------------------


class OperatorProcess(ShoalProcess):
    """`shoal operator` with its liveness and metrics endpoints on free loopback ports."""

    def __init__(self, cluster, log_path: Path, *extra: str) -> None:
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics = f"127.0.0.1:{free_port()}"
        argv = ["operator", "--kubeconfig", str(cluster.kubeconfig)]
        argv += ["--liveness", self.liveness, "--metrics", self.metrics, *extra]
        # Only --kubeconfig says where the cluster is (the session exports KUBECONFIG).
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        super().__init__(argv, log_path, env)

    def alive(self) -> bool:
        return self.get(self.liveness) == 200


@pytest.fixture(scope="module")
def operator(cluster, crds, tmp_path_factory) -> Iterator[OperatorProcess]:
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(cluster, log_path, "--priority", str(PRIORITY))
    try:
        cluster.wait_for("the operator's liveness endpoint", op.alive, timeout=60)
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-4000:]}")


# -- helpers --------------------------------------------------------------------------------


def mdep_manifest(name: str, source: str, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": f"{name}-model", "source": source},
            "replicas": replicas,
            "runtime": {"engine": {"numKvBlocks": 64, "maxNumSeqs": 8}},
            **spec,
        },
    }


def apply(cluster, namespace: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess:
    # --validate=false: the API server itself must judge (kubectl 1.20 would check first).
    cmd = [str(cluster.kubectl_path), f"--kubeconfig={cluster.kubeconfig}", "-n", namespace]
    cmd += ["apply", "--validate=false", "-f", "-"]
    return subprocess.run(cmd, input=json.dumps(manifest), capture_output=True, text=True)


def get_mdep(cluster, namespace: str, name: str) -> dict[str, Any]:
    api = client.CustomObjectsApi(cluster.api_client)
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def workers(cluster, namespace: str, name: str) -> list[client.V1Pod]:
    pods = cluster.core.list_namespaced_pod(
        namespace, label_selector=f"shoal.dev/deployment={name}"
    ).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def ready_workers(cluster, namespace: str, name: str) -> list[client.V1Pod]:
    out = []
    for p in workers(cluster, namespace, name):
        conds = {c.type: c.status for c in p.status.conditions or []}
        if p.status.phase == "Running" and conds.get("Ready") == "True":
            out.append(p)
    return out


def wait_ready(cluster, namespace: str, name: str, n: int) -> dict[str, Any]:
    def done():
        m = get_mdep(cluster, namespace, name)
        s = m.get("status") or {}
        ok = s.get("phase") == "Ready" and s.get("readyReplicas") == n
        ok = ok and len(ready_workers(cluster, namespace, name)) == n
        return m if ok and len(workers(cluster, namespace, name)) == n else None

    return cluster.wait_for(f"{n} ready workers of {name}", done, timeout=WORKER_TIMEOUT)


def condition(m: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in m["status"]["conditions"] if c["type"] == type_)


def events(cluster, namespace: str, name: str) -> list[str]:
    out = cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [f"{e.reason}: {e.message}" for e in out.items]


# -- tests ----------------------------------------------------------------------------------


def test_crd_is_served_with_short_name(cluster, crds):
    out = cluster.kubectl("api-resources", "--api-group=shoal.dev", "-o", "wide")
    assert "modeldeployments" in out and "mdep" in out


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"replicas": -1}, "spec.replicas"),
        ({"model": {"name": "x", "source": "/m", "dtype": "int4"}}, "spec.model.dtype"),
        ({"model": {"name": "x"}}, "spec.model.source"),
        ({"model": {"name": "x", "source": "relative/path"}}, "spec.model.source"),
        ({"runtime": {"engine": {"maxNumSeqs": 0}}}, "maxNumSeqs"),
    ],
)
def test_invalid_model_deployment_is_rejected_by_the_api_server(
    cluster, crds, namespace, patch, words
):
    manifest = mdep_manifest("bad", "/models/x")
    manifest["spec"].update(patch)
    proc = apply(cluster, namespace, manifest)
    assert proc.returncode != 0
    assert 'The ModelDeployment "bad" is invalid' in proc.stderr
    assert words in proc.stderr


def test_lifecycle(cluster, operator, namespace, tiny_model):
    """Apply 2 replicas, read status and columns, scale to 3, lose a worker, delete it all."""
    name = "tiny"
    proc = apply(cluster, namespace, mdep_manifest(name, tiny_model, replicas=2))
    assert proc.returncode == 0, proc.stderr

    m = wait_ready(cluster, namespace, name, 2)
    status = m["status"]
    assert status["replicas"] == 2
    assert status["observedGeneration"] == m["metadata"]["generation"]
    assert status["selector"] == "app.kubernetes.io/name=shoal-worker,shoal.dev/deployment=tiny"
    assert condition(m, "Ready")["status"] == "True"
    assert condition(m, "Degraded")["status"] == "False"
    pods = ready_workers(cluster, namespace, name)
    assert {w["name"] for w in status["workers"]} == {p.metadata.name for p in pods}
    for p in pods:
        assert p.metadata.name.startswith(f"{name}-") and len(p.metadata.name) == len(name) + 6
        assert p.metadata.labels["app.kubernetes.io/managed-by"] == "shoal-operator"
        assert p.metadata.owner_references[0].uid == m["metadata"]["uid"]
        assert p.status.pod_ip.startswith("127.")
    # The endpoints in status are real workers answering the OpenAI API.
    for w in status["workers"]:
        with _LOOPBACK.open(f"{w['endpoint']}/v1/models", timeout=10) as r:
            assert f"{name}-model" in r.read().decode()

    table = cluster.kubectl("get", "mdep", name, "-n", namespace)
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "MODEL", "REPLICAS", "READY", "PHASE", "AGE"]
    assert row.split()[:5] == [name, f"{name}-model", "2", "2", "Ready"]
    svc = cluster.core.read_namespaced_service(f"{name}-workers", namespace)
    assert svc.spec.cluster_ip == "None"

    cluster.kubectl("scale", "mdep", name, "-n", namespace, "--replicas=3")
    wait_ready(cluster, namespace, name, 3)

    victim = ready_workers(cluster, namespace, name)[0].metadata.name
    cluster.core.delete_namespaced_pod(victim, namespace)
    cluster.wait_for(
        f"{victim} to be replaced",
        lambda: (
            victim not in {p.metadata.name for p in workers(cluster, namespace, name)}
            and len(ready_workers(cluster, namespace, name)) == 3
        ),
        timeout=WORKER_TIMEOUT,
    )

    # A stray pod wearing our label goes.
    stray = f"{name}-stray"
    cluster.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": stray, "labels": {"shoal.dev/deployment": name}},
            "spec": {"containers": [{"name": "c", "image": "x", "command": ["sleep", "600"]}]},
        },
    )
    cluster.wait_for(
        "the stray pod to be deleted",
        lambda: stray not in {p.metadata.name for p in workers(cluster, namespace, name)},
        timeout=60,
    )

    with _LOOPBACK.open(f"http://{operator.metrics}/metrics", timeout=5) as r:
        exported = r.read().decode()
    assert (
        f'shoal_operator_workers_created_total{{deployment="{name}",namespace="{namespace}"}}'
        in exported
    )
    assert 'shoal_operator_reconciles_total{result="ok"}' in exported

    said = events(cluster, namespace, name)
    assert any(e.startswith("CreatedWorker") for e in said), said
    assert any(e.startswith("DeletedWorker") for e in said), said

    cluster.kubectl("delete", "mdep", name, "-n", namespace, "--wait=true", "--timeout=120s")
    left = cluster.core.list_namespaced_pod(namespace, label_selector="shoal.dev/deployment=tiny")
    assert left.items == [], [p.metadata.name for p in left.items]
    services = cluster.core.list_namespaced_service(namespace).items
    assert [s.metadata.name for s in services] == []


def test_rolling_update_replaces_workers_one_at_a_time(cluster, operator, namespace, tiny_model):
    name = "roll"
    assert apply(cluster, namespace, mdep_manifest(name, tiny_model, replicas=2)).returncode == 0
    old_hash = wait_ready(cluster, namespace, name, 2)["status"]["specHash"]
    old_pods = {p.metadata.name for p in workers(cluster, namespace, name)}

    changed = mdep_manifest(name, tiny_model, replicas=2)
    changed["spec"]["runtime"]["engine"]["maxNumSeqs"] = 4
    assert apply(cluster, namespace, changed).returncode == 0

    most_pods, least_ready = 0, 2

    def rolled():
        nonlocal most_pods, least_ready
        live = workers(cluster, namespace, name)
        ready = ready_workers(cluster, namespace, name)
        most_pods = max(most_pods, len(live))
        least_ready = min(least_ready, len(ready))
        m = get_mdep(cluster, namespace, name)
        s = m.get("status") or {}
        new = {p.metadata.name for p in live}
        return s.get("phase") == "Ready" and not (new & old_pods) and len(ready) == 2 and m

    m = cluster.wait_for("the rolling update", rolled, timeout=2 * WORKER_TIMEOUT, interval=0.3)
    assert m["status"]["specHash"] != old_hash
    for p in workers(cluster, namespace, name):
        assert p.metadata.labels["shoal.dev/spec-hash"] == m["status"]["specHash"]
    assert most_pods <= 3  # surge of one
    assert least_ready >= 2  # never below the wanted ready count (what polling saw)


def test_unservable_specs_get_conditions_not_crash_loops(cluster, operator, namespace, tiny_model):
    cases = {
        "nosource": (mdep_manifest("nosource", "/nonexistent/model", replicas=1),
                     "ModelSourceNotFound", "Failed"),
        "nogpu": (mdep_manifest("nogpu", tiny_model, replicas=1, runtime={
            "resources": {"limits": {"nvidia.com/gpu": 64}}}), "Unschedulable", "Failed"),
        "crashes": (mdep_manifest("crashes", tiny_model, replicas=1, runtime={
            "command": ["sh", "-c", "echo broken >&2; exit 3"]}), "WorkerCrashLoop", "Failed"),
        "later": (mdep_manifest("later", tiny_model, replicas=1, moe={"experts": 2}),
                  "NotImplemented", "Failed"),
    }  # fmt: skip
    for manifest, _, _ in cases.values():
        proc = apply(cluster, namespace, manifest)
        assert proc.returncode == 0, proc.stderr

    for name, (_, reason, phase) in cases.items():

        def reported(name=name, reason=reason):
            m = get_mdep(cluster, namespace, name)
            ready = condition(m, "Ready") if (m.get("status") or {}).get("conditions") else {}
            return ready.get("reason") == reason and m

        m = cluster.wait_for(f"{name}: condition {reason}", reported, timeout=120)
        ready = condition(m, "Ready")
        assert ready["status"] == "False" and ready["message"]
        assert m["status"]["phase"] == phase
        assert condition(m, "Degraded")["status"] == "True"
        assert any(e.startswith(reason) for e in events(cluster, namespace, name))

    assert (
        "not implemented yet"
        in condition(get_mdep(cluster, namespace, "later"), "Ready")["message"]
    )
    assert (
        "Insufficient nvidia.com/gpu"
        in condition(get_mdep(cluster, namespace, "nogpu"), "Ready")["message"]
    )
    # No worker churn: a rejected spec gets no pods, the others keep exactly their one pod.
    assert workers(cluster, namespace, "nosource") == []
    assert workers(cluster, namespace, "later") == []
    assert len(workers(cluster, namespace, "nogpu")) == 1
    assert len(workers(cluster, namespace, "crashes")) == 1
    assert operator.alive()


def test_refused_worker_pod_is_reported(cluster, operator, namespace):
    """The API server refuses the second worker (a quota): FailedCreate, not a retry storm."""
    cluster.core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}}
    )
    name = "quota"
    sleeper = {"command": ["sh", "-c", "exec sleep 3600"]}
    assert (
        apply(cluster, namespace, mdep_manifest(name, "/", replicas=2, runtime=sleeper)).returncode
        == 0
    )

    def reported():
        m = get_mdep(cluster, namespace, name)
        conds = (m.get("status") or {}).get("conditions")
        return conds and condition(m, "Ready")["reason"] == "FailedCreate" and m

    m = cluster.wait_for("condition FailedCreate", reported, timeout=90)
    assert m["status"]["phase"] == "Failed"
    assert "quota" in condition(m, "Ready")["message"]
    said = [e for e in events(cluster, namespace, name) if e.startswith("FailedCreate")]
    assert len(said) == 1, said  # one Warning, however often reconcile runs into it
    assert len(workers(cluster, namespace, name)) <= 1


def test_two_operator_replicas_hand_over(cluster, operator, namespace, tmp_path):
    """kopf peering: only the highest priority replica acts; the other takes over when it goes."""
    name = "ha"
    sleeper = mdep_manifest(
        name, "/", replicas=1, runtime={"command": ["sh", "-c", "exec sleep 3600"]}
    )
    assert apply(cluster, namespace, sleeper).returncode == 0
    (first_pod,) = cluster.wait_for("the first worker", lambda: workers(cluster, namespace, name))

    second = OperatorProcess(cluster, tmp_path / "second.log", "--priority", str(PRIORITY + 1))
    try:
        cluster.wait_for("the second operator to start", second.alive, timeout=60)
        cluster.wait_for(
            "the first operator to pause for the higher priority one",
            lambda: "Pausing operations in favour of" in operator.log(),
            timeout=60,
        )
        api = client.CustomObjectsApi(cluster.api_client)
        peering = api.get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "shoal-operator"
        )
        assert len(peering["status"]) == 2

        # Now only the second acts: a lost worker is replaced by it.
        cluster.core.delete_namespaced_pod(first_pod.metadata.name, namespace)
        cluster.wait_for(
            "the second operator to replace the worker",
            lambda: f"{namespace}/{name}: created worker" in second.log(),
            timeout=60,
        )
        assert len(workers(cluster, namespace, name)) == 1
    finally:
        second.stop()
    cluster.wait_for(
        "the first operator to resume",
        lambda: "Resuming operations after the pause" in operator.log(),
        timeout=90,
    )
    assert operator.alive()
