"""Start, describe and stop the local cluster: real control-plane binaries as processes.

`up` makes certificates, starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the node agent and Prometheus on loopback with free ports, writes a
kubeconfig, and waits until each answers and the `default` ServiceAccount has its token
(pods created before that are rejected by the ServiceAccount admission plugin). What ran
is recorded in STATE_DIR/state.json, which `status` and `down` read.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.e2e import procs
from shoal.e2e.binaries import Binaries, cache_root, ensure_binaries
from shoal.e2e.configs import kubeconfig, prometheus_config
from shoal.e2e.pki import SERVICE_CIDR, make_pki

log = logging.getLogger("shoal.e2e")

NODE_NAME = "shoal-node"
# Start order; `down` goes in reverse (the node agent stops its pods before the API goes).
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "node-agent",
    "pod-sd",
    "prometheus",
)


def default_state_dir() -> Path:
    return cache_root() / "dev-cluster"


@dataclass
class ClusterState:
    state_dir: str
    apiserver_url: str
    kubeconfig: str
    kubectl: str
    helm: str
    prometheus_url: str
    node_name: str
    pod_cidr: str
    ca_file: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)
    started_seconds: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    def log_path(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.dir / "state.json")

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        try:
            return cls(**json.loads((state_dir / "state.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def running(self) -> dict[str, bool]:
        return {c: procs.alive(self.pids[c], self.markers[c]) for c in self.pids}


def _tls_context(state: ClusterState) -> ssl.SSLContext:
    pki = Path(state.state_dir) / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _start(state: ClusterState, name: str, argv: list[str], env: dict | None = None) -> None:
    log.info("starting %s", name)
    state.pids[name] = procs.start(argv, state.log_path(name), env=env)
    # What /proc/PID/cmdline must contain for the pid to still be ours.
    state.markers[name] = argv[2] if argv[0] == sys.executable else argv[0]
    state.save()


def start_extra(state: ClusterState, name: str, argv: list[str]) -> int:
    """Run another long-lived process with the cluster (e.g. the operator for the demo):
    its log goes to logs/NAME.log, `status` shows it and `down` stops it first."""
    if name in COMPONENTS:
        raise ValueError(f"{name} is a cluster component")
    env = {**os.environ, "KUBECONFIG": state.kubeconfig, "PYTHONUNBUFFERED": "1"}
    _start(state, name, argv, env=env)
    return state.pids[name]


def _wait(state: ClusterState, name: str, check, timeout: float = 60.0) -> None:
    hint = f"; log: {state.log_path(name)}\n{procs.log_tail(state.log_path(name))}"
    pid, marker = state.pids[name], state.markers[name]
    procs.wait_for(name, check, timeout, lambda: procs.alive(pid, marker), hint)


def up(state_dir: Path | None = None, binaries: Binaries | None = None) -> ClusterState:
    """A fresh cluster (any previous one in the same state dir is stopped and wiped)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    old = ClusterState.load(state_dir)
    if old is not None:
        down(state_dir)
    elif state_dir.exists() and any(state_dir.iterdir()):
        # `up` wipes its state dir: never do that to a folder that is not one of ours.
        raise RuntimeError(f"{state_dir} is not empty and holds no dev cluster; pick another --dir")
    bins = binaries or ensure_binaries()
    t0 = time.monotonic()
    shutil.rmtree(state_dir, ignore_errors=True)
    (state_dir / "logs").mkdir(parents=True)
    pki = make_pki(state_dir / "pki", NODE_NAME)
    ports = {
        n: procs.free_port()
        for n in (
            "etcd",
            "etcd-peer",
            "apiserver",
            "controller-manager",
            "scheduler",
            "pod-sd",
            "prometheus",
        )
    }
    api = f"https://127.0.0.1:{ports['apiserver']}"
    kc = state_dir / "kubeconfig"
    kc.write_text(kubeconfig(api, pki.ca_crt, "admin", pki.crt("admin"), pki.key("admin")))
    for ident in ("kube-controller-manager", "kube-scheduler", "node-agent"):
        (state_dir / f"{ident}.kubeconfig").write_text(
            kubeconfig(api, pki.ca_crt, ident, pki.crt(ident), pki.key(ident))
        )
    state = ClusterState(
        state_dir=str(state_dir),
        apiserver_url=api,
        kubeconfig=str(kc),
        kubectl=str(bins.kubectl),
        helm=str(bins.helm),
        prometheus_url=f"http://127.0.0.1:{ports['prometheus']}",
        node_name=NODE_NAME,
        # A /16 of loopback per cluster, so two clusters (a dev one and a test session)
        # never hand out the same pod address.
        pod_cidr=f"127.{random.randint(10, 250)}.0.0/16",
        ca_file=str(pki.ca_crt),
        ports=ports,
    )
    state.save()
    try:
        _start_all(state, bins, pki)
    except BaseException:
        log.error(
            "cluster start failed; stopping what was started (logs in %s)", state_dir / "logs"
        )
        down(state_dir)
        raise
    state.started_seconds = round(time.monotonic() - t0, 1)
    state.save()
    log.info("cluster up in %.1f s", state.started_seconds)
    return state


def _start_all(state: ClusterState, bins: Binaries, pki) -> None:
    d, p = state.dir, state.ports
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
    _start(state, "etcd", [
        str(bins.etcd), "--name", "shoal", "--data-dir", str(d / "etcd"),
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"shoal={peer_url}", "--log-level", "warn",
    ])  # fmt: skip
    _wait(state, "etcd", lambda: procs.http_ok(f"{etcd_url}/health"))

    _start(state, "kube-apiserver", [
        str(bins.kube_apiserver),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}", "--insecure-port=0",
        "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
        f"--cert-dir={d / 'apiserver-certs'}",
        f"--tls-cert-file={pki.crt('apiserver')}", f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_crt}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--v=1",
    ])  # fmt: skip
    ctx = _tls_context(state)
    _wait(state, "kube-apiserver", lambda: procs.http_ok(f"{state.apiserver_url}/readyz", ctx))

    _start(state, "kube-controller-manager", [
        str(bins.kube_controller_manager),
        f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", "--address=127.0.0.1",
        "--secure-port=0", f"--port={p['controller-manager']}",
        "--use-service-account-credentials",
        f"--root-ca-file={pki.ca_crt}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--cluster-signing-cert-file={pki.ca_crt}", f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--leader-elect=false",
        "--v=1",
    ])  # fmt: skip
    _start(state, "kube-scheduler", [
        str(bins.kube_scheduler),
        f"--kubeconfig={d / 'kube-scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", "--address=127.0.0.1",
        "--secure-port=0", f"--port={p['scheduler']}",
        "--leader-elect=false",
        "--v=1",
    ])  # fmt: skip
    for name, port in (
        ("kube-controller-manager", "controller-manager"),
        ("kube-scheduler", "scheduler"),
    ):
        _wait(state, name, lambda port=port: procs.http_ok(f"http://127.0.0.1:{p[port]}/healthz"))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (d / "node").mkdir(exist_ok=True)
    _start(state, "node-agent", [
        sys.executable, "-m", "shoal.e2e.node_agent",
        "--kubeconfig", str(d / "node-agent.kubeconfig"),
        "--node-name", state.node_name, "--state-dir", str(d / "node"),
        "--pod-cidr", state.pod_cidr, "--apiserver", state.apiserver_url,
        "--ca-file", str(pki.ca_crt),
    ], env=env)  # fmt: skip
    # The rest needs only the apiserver: start it all, then wait for each (Python start-up
    # and Prometheus's overlap instead of adding up).
    sd_url = f"http://127.0.0.1:{p['pod-sd']}/targets"
    _start(state, "pod-sd", [
        sys.executable, "-m", "shoal.e2e.pod_sd",
        "--kubeconfig", state.kubeconfig, "--port", str(p["pod-sd"]),
    ], env=env)  # fmt: skip
    prom_dir = d / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(prometheus_config(sd_url))
    _start(state, "prometheus", [
        str(bins.prometheus),
        f"--config.file={prom_dir / 'prometheus.yml'}",
        f"--storage.tsdb.path={prom_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{p['prometheus']}",
        "--web.enable-lifecycle",
    ])  # fmt: skip
    node_path = f"/api/v1/nodes/{state.node_name}"
    _wait(state, "node-agent", lambda: _api_get(state, ctx, node_path, _node_ready))
    _wait(state, "pod-sd", lambda: procs.http_ok(sd_url))
    _wait(state, "prometheus", lambda: procs.http_ok(f"{state.prometheus_url}/-/ready"))

    # Pods are rejected until the ServiceAccount controller made `default` its token.
    _wait(state, "kube-controller-manager", lambda: _api_get(
        state, ctx, "/api/v1/namespaces/default/serviceaccounts/default",
        lambda sa: bool(sa.get("secrets")),
    ))  # fmt: skip


def _node_ready(node: dict) -> bool:
    conds = node.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _api_get(state: ClusterState, ctx: ssl.SSLContext, path: str, pred) -> bool:
    body = procs.http_get(state.apiserver_url + path, ctx)
    try:
        return body is not None and bool(pred(json.loads(body)))
    except ValueError:
        return False


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every component (reverse order) and leftover pod processes; returns what ran."""
    state_dir = (state_dir or default_state_dir()).resolve()
    state = ClusterState.load(state_dir)
    if state is None:
        return []
    stopped = []
    # Extras first (an operator or gateway started next to the cluster), then the cluster.
    extras = [n for n in state.pids if n not in COMPONENTS]
    for name in [*extras, *reversed(COMPONENTS)]:
        if name in state.pids and procs.stop(state.pids[name], state.markers[name]):
            stopped.append(name)
            log.info("stopped %s", name)
    # Pods whose agent died before stopping them: their process groups are recorded.
    try:
        for pgid in json.loads((state_dir / "node" / "pod-pids.json").read_text()):
            procs.kill_group_if_exists(int(pgid))
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    state.pids.clear()
    state.save()
    return stopped


def usage_text(state: ClusterState) -> str:
    kubectl_dir = str(Path(state.kubectl).parent)
    default = Path(state.state_dir) == default_state_dir().resolve()
    dir_flag = "" if default else f" --dir {state.state_dir}"
    helm_dir = str(Path(state.helm).parent)
    return "\n".join(
        [
            f"Local cluster is up (state in {state.state_dir}, logs in {state.state_dir}/logs).",
            "Use it from this shell with:",
            f"  export KUBECONFIG={state.kubeconfig}",
            f'  export PATH={kubectl_dir}:{helm_dir}:"$PATH"   # kubectl 1.20.2 and helm',
            "  kubectl get nodes,pods -A",
            f"kubectl:     {state.kubectl}",
            f"helm:        {state.helm}",
            f"API server:  {state.apiserver_url}",
            f"Prometheus:  {state.prometheus_url}",
            f"Pod logs:    {state.state_dir}/node/pods/<namespace>_<pod>_<uid8>/<container>.log",
            f"Stop it with: shoal dev-cluster down{dir_flag}",
        ]
    )
