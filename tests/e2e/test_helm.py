"""The Helm chart: lint, template, and install/upgrade/uninstall on the local cluster.

Uses the cluster fixture's helm (3.17.2) and kubectl (1.20). On the local cluster the
chart's pods run as local processes through the node agent, each with its own
service-account token, so the RBAC rendered here is what they really get.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = str(REPO / "charts" / "shoal")
START_TIMEOUT = "270s"  # `shoal` pods start slowly on 2 shared cores; within helm()'s 300 s


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return cluster.helm(*args, check=check)


def render(cluster, *sets: str, api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    args = ["template", "rel", CHART, "--namespace", "shoal-test"]
    for s in sets:
        args += ["--set", s]
    for v in api_versions:
        args += ["--api-versions", v]
    return [d for d in yaml.safe_load_all(helm(cluster, *args).stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


# -- lint and template (no cluster state touched) -------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [(), ("scope.namespaced=true",), ("serviceMonitor.enabled=true", "operator.replicas=2")],
    ids=["defaults", "namespaced", "monitors"],
)
def test_lint(cluster, sets):
    args = ["lint", "--strict", CHART]
    for s in sets:
        args += ["--set", s]
    out = helm(cluster, *args)
    assert "0 chart(s) failed" in out.stdout


def test_template_cluster_wide_uses_cluster_roles(cluster):
    docs = render(cluster)
    assert kinds(docs).count("ClusterRole") == 2  # operator, gateway
    assert kinds(docs).count("ClusterRoleBinding") == 2
    op = next(d for d in docs if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"])
    container = op["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["shoal", "operator"]
    assert "--all-namespaces" in container["args"]


def test_template_namespaced_uses_roles_only(cluster):
    docs = render(cluster, "scope.namespaced=true", "scope.watchNamespace=models")
    assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)
    roles = [d for d in docs if d["kind"] == "Role"]
    watched = {d["metadata"]["namespace"] for d in roles if "leases" not in d["metadata"]["name"]}
    assert watched == {"models"}
    gw = next(d for d in docs if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"])
    args = gw["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--namespace") + 1] == "models"


def test_template_gateway_rbac_is_read_only(cluster):
    docs = render(cluster)
    role = next(
        d for d in docs if d["kind"] == "ClusterRole" and "gateway" in d["metadata"]["name"]
    )
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}


def test_template_monitors_only_when_the_crds_exist(cluster):
    absent = render(cluster, "serviceMonitor.enabled=true")
    assert "ServiceMonitor" not in kinds(absent) and "PodMonitor" not in kinds(absent)
    present = render(
        cluster, "serviceMonitor.enabled=true", api_versions=("monitoring.coreos.com/v1",)
    )
    assert "ServiceMonitor" in kinds(present) and "PodMonitor" in kinds(present)
    assert "ServiceMonitor" not in kinds(
        render(cluster, api_versions=("monitoring.coreos.com/v1",))
    )


def test_template_operator_metrics_port_is_served_and_scraped_with_its_own_labels(cluster):
    docs = render(
        cluster, "serviceMonitor.enabled=true", api_versions=("monitoring.coreos.com/v1",)
    )
    op = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    container = op["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--metrics") + 1] == "$(POD_IP):9090"
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    monitors = [
        d for d in docs if d["kind"] == "PodMonitor" and "operator" in d["metadata"]["name"]
    ]
    assert [m["spec"]["podMetricsEndpoints"][0]["honorLabels"] for m in monitors] == [True]

    off = render(cluster, "operator.metricsPort=0", api_versions=("monitoring.coreos.com/v1",))
    op = next(
        d for d in off if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    )
    assert "--metrics" not in op["spec"]["template"]["spec"]["containers"][0]["args"]


# -- install, upgrade, uninstall on the local cluster ---------------------------------------


def kubectl_json(cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def released(cluster, namespace: str, kind: str, release: str) -> list[str]:
    sel = f"app.kubernetes.io/instance={release}"
    ns = ["-n", namespace] if namespace else []
    items = kubectl_json(cluster, "get", kind, *ns, "-l", sel)["items"]
    return [i["metadata"]["name"] for i in items if not i["metadata"].get("deletionTimestamp")]


def gateway_pod(cluster, namespace: str, release: str) -> dict[str, Any]:
    sel = f"app.kubernetes.io/name=shoal-gateway,app.kubernetes.io/instance={release}"
    pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", sel)["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    return live[0]


def can_i(
    cluster, namespace: str, account: str, verb: str, resource: str, where: str, *extra: str
) -> bool:
    out = cluster.kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        where,
        f"--as=system:serviceaccount:{namespace}:{account}",
        *extra,
        check=False,
    )
    return out.strip() == "yes"


def serve_one_model(cluster, namespace: str, gateway_url: str, source: str) -> None:
    """Apply a one-worker ModelDeployment, chat through the gateway, delete it again."""
    manifest = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "helm-smoke"},
        "spec": {
            "model": {"name": "helm-smoke", "source": source},
            "replicas": 1,
            "runtime": {"engine": {"numKvBlocks": 64, "maxNumSeqs": 4}},
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    cluster.wait_for(
        "the chart's gateway to route to a ready worker",
        lambda: httpx.get(f"{gateway_url}/health").json()["ready_workers"] == 1,
        timeout=240,
    )
    reply = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused").chat.completions.create(
        model="helm-smoke", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    # Deleted while the operator still runs, so its finalizer is released.
    cluster.kubectl("delete", "mdep", "helm-smoke", "-n", namespace, "--timeout=120s")


def test_install_upgrade_uninstall_namespaced(cluster, namespace, tiny_model):
    release = "shoal"
    try:
        helm(
            cluster,
            "install",
            release,
            CHART,
            "-n",
            namespace,
            "--set",
            "scope.namespaced=true",
            "--wait",
            "--timeout",
            START_TIMEOUT,
        )
        # Both pods run (as local processes) and the gateway is Ready: it listed pods and
        # ModelDeployments with its own, namespaced, read-only rights.
        deployments = kubectl_json(cluster, "get", "deployments", "-n", namespace)["items"]
        ready = {d["metadata"]["name"]: d["status"].get("readyReplicas") for d in deployments}
        assert ready == {f"{release}-operator": 1, f"{release}-gateway": 1}
        pod = gateway_pod(cluster, namespace, release)
        url = f"http://{pod['status']['podIP']}:8080"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert httpx.get(f"{url}/v1/models").json() == {"object": "list", "data": []}
        # Least privilege, checked by the apiserver itself.
        gw, op = f"{release}-gateway", f"{release}-operator"
        assert can_i(cluster, namespace, gw, "watch", "pods", namespace)
        assert not can_i(cluster, namespace, gw, "create", "pods", namespace)
        assert not can_i(cluster, namespace, gw, "list", "pods", "default")
        assert can_i(cluster, namespace, op, "create", "pods", namespace)
        assert can_i(
            cluster,
            namespace,
            op,
            "patch",
            "modeldeployments.shoal.dev",
            namespace,
            "--subresource=status",
        )
        assert not can_i(cluster, namespace, op, "create", "pods", "default")
        assert not can_i(cluster, namespace, op, "get", "secrets", namespace)
        assert released(cluster, "", "clusterroles", release) == []

        # Upgrade: a changed value reaches the running gateway.
        helm(
            cluster,
            "upgrade",
            release,
            CHART,
            "-n",
            namespace,
            "--reuse-values",
            "--set",
            "gateway.scrapeInterval=3",
            "--wait",
            "--timeout",
            START_TIMEOUT,
        )

        def rolled() -> dict[str, Any] | None:
            pod = gateway_pod(cluster, namespace, release)
            args = pod["spec"]["containers"][0]["args"]
            ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            ok = args[args.index("--scrape-interval") + 1] == "3" and ready.get("Ready") == "True"
            return pod if ok else None

        pod = cluster.wait_for("the upgraded gateway pod", rolled, timeout=300)
        history = helm(cluster, "history", release, "-n", namespace, "-o", "json").stdout
        assert [h["revision"] for h in json.loads(history)] == [1, 2]

        # The chart's own operator and gateway, with only the chart's RBAC, serve a model.
        url = f"http://{pod['status']['podIP']}:8080"
        serve_one_model(cluster, namespace, url, tiny_model)
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, check=False)

    # Nothing of the release is left but the CRDs, which Helm keeps by design.
    for kind in ("deployments", "services", "serviceaccounts", "roles", "rolebindings", "pods"):
        cluster.wait_for(
            f"{kind} of the release to go",
            lambda kind=kind: released(cluster, namespace, kind, release) == [],
            timeout=120,
        )
    for crd in ("modeldeployments.shoal.dev", "kopfpeerings.kopf.dev"):
        assert kubectl_json(cluster, "get", "crd", crd)["metadata"]["name"] == crd


def test_install_cluster_wide_creates_and_removes_cluster_roles(cluster, namespace):
    # The operator stays at 0 replicas: a second cluster-wide operator would reconcile
    # other tests' ModelDeployments. The gateway runs and needs its ClusterRole to be Ready.
    # serviceMonitor.enabled with no Prometheus Operator CRDs: skipped, install succeeds.
    release = f"cw-{namespace}"
    try:
        helm(
            cluster,
            "install",
            release,
            CHART,
            "-n",
            namespace,
            "--set",
            "operator.replicas=0",
            "--set",
            "serviceMonitor.enabled=true",
            "--wait",
            "--timeout",
            START_TIMEOUT,
        )
        roles = sorted(released(cluster, "", "clusterroles", release))
        assert roles == [f"{release}-shoal-gateway", f"{release}-shoal-operator"]
        gw = f"{release}-shoal-gateway"
        assert can_i(cluster, namespace, gw, "list", "pods", "default")
        assert not can_i(cluster, namespace, gw, "delete", "pods", "default")
        pod = gateway_pod(cluster, namespace, release)
        assert httpx.get(f"http://{pod['status']['podIP']}:8080/health").status_code == 200
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, check=False)
    for kind in ("clusterroles", "clusterrolebindings"):
        cluster.wait_for(
            f"{kind} of the release to go",
            lambda kind=kind: released(cluster, "", kind, release) == [],
            timeout=60,
        )
