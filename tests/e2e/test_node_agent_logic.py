"""The node agent's and harness's decisions, without a cluster (fast tier)."""

from __future__ import annotations

import pytest
import yaml

from shoal.e2e import pod_sd, podspec
from shoal.e2e.apt import add_deb_src_deb822, add_deb_src_one_line
from shoal.e2e.configs import kubeconfig, prometheus_config
from shoal.e2e.pki import subject
from shoal.e2e.podspec import ContainerView, Probe, ProbeState, SpecError

POD = {
    "metadata": {"name": "w-abcde", "namespace": "ns1", "uid": "u1", "labels": {"a": "b"}},
    "spec": {"nodeName": "n"},
}


def test_expand_follows_kubelet_rules():
    env = {"POD_IP": "127.9.0.1", "PORT": "8000"}
    assert podspec.expand("--host=$(POD_IP):$(PORT)", env) == "--host=127.9.0.1:8000"
    assert podspec.expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert podspec.expand("$$(POD_IP) is escaped", env) == "$(POD_IP) is escaped"


def test_env_resolves_downward_api_and_earlier_vars():
    container = {
        "name": "worker",
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "LBL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['a']"}}},
            {"name": "URL", "value": "http://$(POD_IP):8000"},
        ],
        "command": ["shoal", "serve"],
        "args": ["--host", "$(POD_IP)", "--port", "8000"],
    }
    env = podspec.container_env(POD, container, "127.9.0.7")
    assert env == {
        "POD_IP": "127.9.0.7",
        "NAME": "w-abcde",
        "NS": "ns1",
        "LBL": "b",
        "URL": "http://127.9.0.7:8000",
    }
    argv = podspec.container_argv(container, env)
    assert argv == ["shoal", "serve", "--host", "127.9.0.7", "--port", "8000"]


def test_unsupported_sources_are_clear_errors():
    secret = {"name": "c", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}
    with pytest.raises(SpecError, match="secretKeyRef is not supported"):
        podspec.container_env(POD, secret, "127.9.0.1")
    with pytest.raises(SpecError, match="images are not run"):
        podspec.container_argv({"name": "c", "image": "x"}, {})
    with pytest.raises(SpecError, match="names no port"):
        podspec.parse_probe({"httpGet": {"port": "http"}}, {"name": "c"})


def test_pod_ips_stay_inside_the_block_and_skip_network_and_broadcast():
    ips = [podspec.pod_ip_for("127.42.0.0/16", i) for i in range(300)]
    assert ips[0] == "127.42.0.1"
    assert ips[253] == "127.42.0.254"
    assert ips[254] == "127.42.1.1"
    assert len(set(ips)) == 300
    assert not any(ip.endswith((".0", ".255")) for ip in ips)


def test_probe_parsing_and_thresholds():
    c = {"name": "w", "ports": [{"name": "http", "containerPort": 8000}]}
    p = podspec.parse_probe(
        {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        c,
    )
    assert p == Probe("httpGet", period=2.0, failure_threshold=2, port=8000, path="/health")
    ps = ProbeState(p)
    assert ps.record(False) is None  # one failure is not yet a verdict
    assert ps.record(True) is True
    assert ps.record(False) is True  # below the failure threshold the old verdict stands
    assert ps.record(False) is False


def test_restart_policy_and_backoff():
    assert podspec.should_restart("Always", 0)
    assert podspec.should_restart("OnFailure", 1) and not podspec.should_restart("OnFailure", 0)
    assert not podspec.should_restart("Never", 1)
    delays = [podspec.restart_backoff(n) for n in range(1, 10)]
    assert delays[:3] == [1.0, 2.0, 4.0] and max(delays) == 30.0


def test_pod_status_phases_and_conditions():
    running = ContainerView("w", state={"running": {"startedAt": "t"}}, started=True, ready=True)
    s = podspec.pod_status([running], "127.9.0.1", "t0", "t1")
    conds = {c["type"]: c["status"] for c in s["conditions"]}
    assert s["phase"] == "Running" and s["podIP"] == "127.9.0.1"
    assert conds == {"Initialized": "True", "Ready": "True", "ContainersReady": "True",
                     "PodScheduled": "True"}  # fmt: skip
    # A transition keeps the earlier time while the status is unchanged.
    s2 = podspec.pod_status([running], "127.9.0.1", "t0", "t2", s["conditions"])
    assert all(c["lastTransitionTime"] == "t1" for c in s2["conditions"])
    crashing = ContainerView("w", state={"waiting": {"reason": "CrashLoopBackOff"}}, started=True)
    s3 = podspec.pod_status([crashing], "127.9.0.1", "t0", "t3", s2["conditions"])
    ready = next(c for c in s3["conditions"] if c["type"] == "Ready")
    assert s3["phase"] == "Running" and ready["status"] == "False"
    assert ready["lastTransitionTime"] == "t3" and ready["reason"] == "ContainersNotReady"
    done = [
        ContainerView("a", finished=True, exit_code=0),
        ContainerView("b", finished=True, exit_code=2),
    ]
    assert podspec.pod_phase(done) == "Failed"
    assert podspec.pod_phase(done[:1]) == "Succeeded"
    assert podspec.pod_phase([ContainerView("a")]) == "Pending"


def test_private_apt_sources_add_deb_src_without_touching_hosts():
    deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    out = add_deb_src_deb822(deb822)
    assert "Types: deb deb-src\n" in out and "URIs: http://mirror.example/debian" in out
    assert add_deb_src_deb822("Types: deb deb-src\n") == "Types: deb deb-src\n"
    one = "deb [arch=amd64] http://mirror.example/debian bookworm main\n# comment\n"
    assert add_deb_src_one_line(one).splitlines() == [
        "deb [arch=amd64] http://mirror.example/debian bookworm main",
        "deb-src [arch=amd64] http://mirror.example/debian bookworm main",
        "# comment",
    ]


def test_config_files(tmp_path):
    kc = yaml.safe_load(kubeconfig("https://127.0.0.1:1", tmp_path / "ca", "u", token="tok"))
    assert kc["users"][0]["user"] == {"token": "tok"}
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1"
    with pytest.raises(ValueError):
        kubeconfig("https://x", tmp_path / "ca", "u")
    prom = yaml.safe_load(prometheus_config("http://127.0.0.1:1/targets"))
    job = prom["scrape_configs"][0]
    assert job["http_sd_configs"][0]["url"] == "http://127.0.0.1:1/targets"
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "true"
    assert subject("system:node:n", ("system:nodes",)) == "/O=system:nodes/CN=system:node:n"


def test_pod_sd_targets_match_kubernetes_sd_pod_role():
    pod = {
        "metadata": {
            "name": "w-1",
            "namespace": "ns",
            "uid": "u",
            "labels": {"app.kubernetes.io/name": "shoal-worker"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"},
            "ownerReferences": [{"kind": "ModelDeployment", "name": "m", "controller": True}],
        },
        "spec": {
            "nodeName": "n",
            "containers": [
                {"name": "worker", "ports": [{"name": "http", "containerPort": 8000}]},
                {"name": "side"},
            ],
        },
        "status": {"podIP": "127.9.0.3", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    no_ip = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"containers": [{"name": "c"}]}}
    groups = pod_sd.targets([pod, no_ip])
    assert [g["targets"] for g in groups] == [["127.9.0.3:8000"], ["127.9.0.3"]]
    labels = groups[0]["labels"]
    assert labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    assert labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "shoal-worker"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "http"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert labels["__meta_kubernetes_pod_controller_kind"] == "ModelDeployment"
