"""The local cluster itself: control plane healthy, pods really run as processes on the
node agent with kubelet semantics, Prometheus scrapes annotated pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from shoal.e2e.fixtures import NO_PROXY, Cluster

pytestmark = pytest.mark.e2e

# A tiny pod program: serves /health, /env (its argv, env and pid) and /metrics on
# $(POD_IP):PORT; on SIGTERM it writes a line and exits 0 (unless told to ignore it).
SERVER = r"""
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
host, port = sys.argv[1], int(sys.argv[2])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(*_):
        print("got SIGTERM", flush=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/metrics":
            body = b"# TYPE shoal_e2e_probe_total counter\nshoal_e2e_probe_total 42\n"
        elif self.path == "/env":
            body = json.dumps({"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid()}).encode()
        elif self.path == "/health":
            body = b"ok"
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving on", host, port, flush=True)
HTTPServer((host, port), H).serve_forever()
"""


def server_pod(name: str, port: int = 8080, **extra) -> dict:
    container = {
        "name": "main",
        "image": "ignored",
        "command": ["python", "-c", SERVER],
        "args": ["$(POD_IP)", str(port)],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "URL", "value": "http://$(POD_IP):" + str(port)},
        ],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
    }
    container.update(extra.pop("container", {}))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **extra.pop("metadata", {})},
        "spec": {"containers": [container], **extra},
    }
    return pod


def pod_ready(cluster, ns: str, name: str):
    pod = cluster.core.read_namespaced_pod(name, ns)
    conds = {c.type: c.status for c in pod.status.conditions or []}
    return pod if conds.get("Ready") == "True" else None


def pod_gone(cluster, ns: str, name: str) -> bool:
    try:
        cluster.core.read_namespaced_pod(name, ns)
    except ApiException as e:
        return e.status == 404
    return False


def output_lines(cluster, ns: str, pod: str, container: str = "main") -> list[str]:
    """What the program printed (the agent's own `--- ...` lines left out)."""
    text = cluster.pod_log(ns, pod, container)
    return [line for line in text.splitlines() if not line.startswith("--- ")]


def get_json(url: str) -> dict:
    with NO_PROXY.open(url, timeout=5) as resp:
        return json.loads(resp.read())


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_control_plane_is_healthy(cluster):
    assert cluster.kubectl("get", "--raw", "/readyz").strip() == "ok"
    version = cluster.kubectl("version", "--short")
    assert "Client Version: v1.20.2" in version and "Server Version: v1.20.2" in version
    node = cluster.core.read_node(cluster.node_name)
    conds = {c.type: c.status for c in node.status.conditions}
    assert conds["Ready"] == "True"
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert not node.spec.taints  # heartbeats keep the node-lifecycle controller content
    # The node's Lease is renewed (heartbeats every 10 s; without them the node would turn
    # NotReady after 40 s and be tainted unreachable).
    coord = client.CoordinationV1Api(cluster.api_client)
    first = coord.read_namespaced_lease(cluster.node_name, "kube-node-lease").spec.renew_time
    cluster.wait_for(
        "a renewed node Lease",
        lambda: (
            coord.read_namespaced_lease(cluster.node_name, "kube-node-lease").spec.renew_time
            > first
        ),
        timeout=30,
    )
    # The session exports the cluster's own kubectl first on PATH, not /usr/bin/kubectl.
    which = subprocess.run(["which", "kubectl"], capture_output=True, text=True).stdout.strip()
    assert which == str(cluster.kubectl_path)
    assert os.environ["KUBECONFIG"] == str(cluster.kubeconfig)
    helm = cluster.helm("version", "--short").stdout
    assert helm.startswith("v3.")


def test_pod_runs_gets_ready_with_its_own_ip_and_dies_on_delete(cluster, namespace):
    cluster.core.create_namespaced_pod(namespace, server_pod("web"))
    pod = cluster.wait_for("pod web Ready", lambda: pod_ready(cluster, namespace, "web"))
    ip = pod.status.pod_ip
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert pod.status.phase == "Running"
    cs = pod.status.container_statuses[0]
    assert cs.ready and cs.restart_count == 0 and cs.state.running is not None

    info = get_json(f"http://{ip}:8080/env")
    assert info["argv"][1:] == [ip, "8080"]  # $(POD_IP) resolved in args
    assert info["env"]["POD_IP"] == ip
    assert info["env"]["MY_NAME"] == "web"
    assert info["env"]["URL"] == f"http://{ip}:8080"  # $(VAR) in env values
    pid = info["pid"]
    assert process_alive(pid)

    cluster.core.delete_namespaced_pod("web", namespace, grace_period_seconds=10)
    cluster.wait_for("pod web object gone", lambda: pod_gone(cluster, namespace, "web"))
    assert not process_alive(pid)
    assert "got SIGTERM" in output_lines(cluster, namespace, "web")


def test_delete_kills_a_process_that_ignores_sigterm(cluster, namespace):
    pod = server_pod("stubborn")
    pod["spec"]["containers"][0]["env"].append({"name": "IGNORE_TERM", "value": "1"})
    cluster.core.create_namespaced_pod(namespace, pod)
    ready = cluster.wait_for(
        "pod stubborn Ready", lambda: pod_ready(cluster, namespace, "stubborn")
    )
    pid = get_json(f"http://{ready.status.pod_ip}:8080/env")["pid"]
    cluster.core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)
    cluster.wait_for("pod stubborn gone", lambda: pod_gone(cluster, namespace, "stubborn"))
    assert not process_alive(pid)
    assert "got SIGTERM" not in output_lines(cluster, namespace, "stubborn")


@pytest.mark.parametrize(
    ("policy", "code", "phase"),
    [("Never", 3, "Failed"), ("OnFailure", 0, "Succeeded"), ("Never", 0, "Succeeded")],
)
def test_finished_containers_follow_restart_policy(cluster, namespace, policy, code, phase):
    name = f"once-{policy.lower()}-{code}"
    pod = {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": policy,
            "containers": [
                {
                    "name": "c",
                    "image": "x",
                    "command": ["python", "-c", f"raise SystemExit({code})"],
                }
            ],
        },
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def finished():
        p = cluster.core.read_namespaced_pod(name, namespace)
        return p if p.status.phase in ("Succeeded", "Failed") else None

    p = cluster.wait_for(f"{name} to finish", finished)
    assert p.status.phase == phase
    cs = p.status.container_statuses[0]
    assert cs.restart_count == 0
    assert cs.state.terminated.exit_code == code


def run_to_completion(cluster, ns: str, name: str, command: list[str]):
    pod = {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "ignored", "command": command}],
        },
    }
    cluster.core.create_namespaced_pod(ns, pod)

    def finished():
        p = cluster.core.read_namespaced_pod(name, ns)
        return p if p.status.phase in ("Succeeded", "Failed") else None

    return cluster.wait_for(f"{name} to finish", finished)


def test_shoal_resolves_from_the_venv_in_pods(cluster, namespace):
    p = run_to_completion(cluster, namespace, "shoal-help", ["shoal", "--help"])
    assert p.status.phase == "Succeeded", output_lines(cluster, namespace, "shoal-help")
    assert any("dev-cluster" in line for line in output_lines(cluster, namespace, "shoal-help"))


CALL_API = """
from kubernetes import client, config
from kubernetes import client
from kubernetes.client.rest import ApiException
config.load_kube_config()
try:
    client.CoreV1Api().list_namespaced_secret("kube-system")
    print("allowed")
except ApiException as e:
    print("status", e.status, "system:serviceaccount:" in e.body)
"""


def test_pods_reach_the_api_as_their_service_account(cluster, namespace):
    # KUBECONFIG carries the pod's own token: authenticated as the ServiceAccount, which
    # RBAC does not allow to read kube-system's secrets (a 403, not a 401).
    p = run_to_completion(cluster, namespace, "api-caller", ["python", "-c", CALL_API])
    lines = output_lines(cluster, namespace, "api-caller")
    assert p.status.phase == "Succeeded", lines
    assert lines[-1] == "status 403 True"


def test_crashing_container_is_restarted(cluster, namespace):
    pod = {
        "metadata": {"name": "crasher"},
        "spec": {
            "restartPolicy": "Always",
            "containers": [
                {
                    "name": "c",
                    "image": "x",
                    "command": ["sh", "-c", "echo boom $(WHO); exit 3"],
                    "env": [{"name": "WHO", "value": "here"}],
                }
            ],
        },
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def restarted_twice():
        p = cluster.core.read_namespaced_pod("crasher", namespace)
        cs = (p.status.container_statuses or [None])[0]
        return p if cs and cs.restart_count >= 2 else None

    p = cluster.wait_for("two restarts", restarted_twice, timeout=60)
    cs = p.status.container_statuses[0]
    assert p.status.phase == "Running"  # a crash loop is Running, not Failed
    assert cs.last_state.terminated.exit_code == 3
    assert not cs.ready
    assert output_lines(cluster, namespace, "crasher", "c").count("boom here") >= 2


def test_liveness_failure_restarts_the_container(cluster, namespace):
    # The liveness probe points at a path the server answers 404: killed and restarted.
    pod = server_pod(
        "unhealthy",
        container={
            "livenessProbe": {
                "httpGet": {"path": "/nope", "port": 8080},
                "periodSeconds": 1,
                "failureThreshold": 2,
            }
        },
    )
    cluster.core.create_namespaced_pod(namespace, pod)

    def restarted():
        p = cluster.core.read_namespaced_pod("unhealthy", namespace)
        cs = (p.status.container_statuses or [None])[0]
        return cs and cs.restart_count >= 1

    cluster.wait_for("a liveness restart", restarted, timeout=60)
    assert "got SIGTERM" in output_lines(cluster, namespace, "unhealthy")


def test_gpu_requests_schedule_against_the_extended_resource(cluster, namespace):
    def gpu_pod(name: str, gpus: int) -> dict:
        limits = {"nvidia.com/gpu": str(gpus)}
        return {
            "metadata": {"name": name},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": "x",
                        "command": ["sleep", "300"],
                        "resources": {"limits": limits, "requests": limits},
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        }

    cluster.core.create_namespaced_pod(namespace, gpu_pod("fits", 2))
    cluster.core.create_namespaced_pod(namespace, gpu_pod("too-big", 9))
    cluster.wait_for(
        "pod fits Running",
        lambda: cluster.core.read_namespaced_pod("fits", namespace).status.phase == "Running",
    )

    def unschedulable():
        p = cluster.core.read_namespaced_pod("too-big", namespace)
        conds = {c.type: c for c in p.status.conditions or []}
        c = conds.get("PodScheduled")
        return c is not None and c.status == "False" and c.reason == "Unschedulable"

    cluster.wait_for("pod too-big Unschedulable", unschedulable)
    assert cluster.core.read_namespaced_pod("too-big", namespace).spec.node_name is None


def test_prometheus_scrapes_an_annotated_pod(cluster, namespace):
    pod = server_pod(
        "metrics",
        port=9100,
        metadata={
            "labels": {"app": "probe"},
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9100",
                "prometheus.io/path": "/metrics",
            },
        },
    )
    cluster.core.create_namespaced_pod(namespace, pod)
    cluster.wait_for("pod metrics Ready", lambda: pod_ready(cluster, namespace, "metrics"))
    query = f'shoal_e2e_probe_total{{namespace="{namespace}",pod="metrics"}}'
    result = cluster.wait_for(
        f"{query} in Prometheus", lambda: cluster.prometheus_query(query), timeout=90
    )
    assert result[0]["value"][1] == "42"
    assert result[0]["metric"]["app"] == "probe"  # pod labels become series labels


def test_dev_cluster_cli_up_status_down(tmp_path):
    """The CLI a person uses: a second, separate cluster; `down` leaves no process behind."""
    state = tmp_path / "c"

    def shoal(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "shoal.cli", "dev-cluster", *args, "--dir", str(state)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    up = shoal("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
        assert "Prometheus:  http://127.0.0.1:" in up.stdout
        status = shoal("status")
        assert status.returncode == 0 and "node-agent" in status.stdout
        kubectl = [
            line.split()[-1] for line in up.stdout.splitlines() if line.startswith("kubectl:")
        ][0]
        kc = f"--kubeconfig={state / 'kubeconfig'}"
        run = subprocess.run(
            [kubectl, kc, "run", "sleeper", "--image=none", "--restart=Never", "--command",
             "--", "sleep", "600"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        pids_file = state / "node" / "pod-pids.json"

        def recorded():
            return pids_file.exists() and json.loads(pids_file.read_text())

        pgids = Cluster.wait_for("the sleeper's process", recorded)
    finally:
        down = shoal("down")
    assert down.returncode == 0 and "kube-apiserver" in down.stdout
    for pgid in pgids:
        assert not process_alive(pgid)
    assert shoal("status").returncode == 1


def test_a_real_worker_pod_serves_and_is_scraped(cluster, namespace, tiny_llama):
    """A pod shaped like the operator's workers runs the real runtime through the agent:
    `shoal serve` resolves from the venv, $(POD_IP) reaches --host, /health gates
    readiness, and Prometheus scrapes the worker's /metrics by annotation."""
    container = {
        "name": "worker",
        "image": "ignored",
        "command": ["shoal", "serve"],
        "args": ["--model", str(tiny_llama), "--served-model-name", "tiny",
                 "--host", "$(POD_IP)", "--port", "8000", "--num-kv-blocks", "64"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
    }  # fmt: skip
    pod = {
        "metadata": {
            "name": "worker",
            "labels": {"app.kubernetes.io/name": "shoal-worker"},
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "8000",
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 10},
    }
    cluster.core.create_namespaced_pod(namespace, pod)
    ready = cluster.wait_for(
        "the worker Ready", lambda: pod_ready(cluster, namespace, "worker"), timeout=300
    )
    ip = ready.status.pod_ip
    models = get_json(f"http://{ip}:8000/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny"]
    query = f'shoal_num_requests_running{{namespace="{namespace}",pod="worker"}}'
    result = cluster.wait_for(
        f"{query} in Prometheus", lambda: cluster.prometheus_query(query), timeout=90
    )
    assert result[0]["metric"]["app_kubernetes_io_name"] == "shoal-worker"
    cluster.core.delete_namespaced_pod("worker", namespace)
    cluster.wait_for("the worker gone", lambda: pod_gone(cluster, namespace, "worker"))
