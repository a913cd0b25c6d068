"""pytest fixtures for tests that need the local Kubernetes cluster.

Use from a conftest.py:  ``from shoal.e2e.fixtures import cluster, namespace  # noqa: F401``

`cluster` (session scope) starts one cluster per test session with the same code as
`shoal dev-cluster up` (building or fetching the binaries on first use, about 8 minutes
cold), exports KUBECONFIG and puts the 1.20 kubectl and helm first on PATH for the session
(this machine's /usr/bin/kubectl is an unrelated newer client), and stops everything at
the end. `namespace` gives each test a fresh namespace, deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config

from shoal.e2e import cluster as cluster_mod

T = TypeVar("T")
# Everything here is on loopback: never through an http_proxy from the environment.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Cluster:
    """Handles to a running local cluster."""

    state: cluster_mod.ClusterState
    api_client: client.ApiClient

    @property
    def kubeconfig(self) -> Path:
        return Path(self.state.kubeconfig)

    @property
    def kubectl_path(self) -> Path:
        return Path(self.state.kubectl)

    @property
    def helm_path(self) -> Path:
        return Path(self.state.helm)

    @property
    def prometheus_url(self) -> str:
        return self.state.prometheus_url

    @property
    def apiserver_url(self) -> str:
        return self.state.apiserver_url

    @property
    def node_name(self) -> str:
        return self.state.node_name

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's log file as the node agent writes it (`kubectl logs` does not work)."""
        base = Path(self.state.state_dir) / "node" / "pods"
        for d in base.glob(f"{namespace}_{pod}_*"):
            f = d / f"{container}.log"
            if f.exists():
                return f.read_text(errors="replace")
        return ""

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        """Run the cluster's kubectl 1.20 against this cluster; returns stdout."""
        cmd = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.helm_path), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def prometheus_query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (empty when nothing matches yet)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with NO_PROXY.open(url, timeout=5) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise AssertionError(f"prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def reconfigure_prometheus(
        self,
        scrape_configs: list[dict[str, Any]] | tuple = (),
        rule_files: list[str] | tuple = (),
    ) -> None:
        """Give the cluster's Prometheus extra scrape jobs and rule files (replacing any given
        before; call with nothing to restore it) and reload it, as a config change on a real
        cluster would. Waits until the new config is the one loaded."""
        import yaml

        path = Path(self.state.state_dir) / "prometheus" / "prometheus.yml"
        base = path.with_name("prometheus.base.yml")
        if not base.exists():
            base.write_text(path.read_text())
        doc = yaml.safe_load(base.read_text())
        doc["scrape_configs"] = [*doc["scrape_configs"], *scrape_configs]
        if rule_files:
            doc["rule_files"] = [str(f) for f in rule_files]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        request = urllib.request.Request(f"{self.prometheus_url}/-/reload", method="POST")
        with NO_PROXY.open(request, timeout=30) as resp:
            if resp.status != 200:
                raise AssertionError(f"prometheus reload answered {resp.status}")

    def create_namespace(self, name: str) -> None:
        """Create a namespace and wait until pods can be made in it (its default
        ServiceAccount has its token; pods are refused before that)."""
        self.core.create_namespace({"metadata": {"name": name}})
        self.wait_for(
            f"the default ServiceAccount token in {name}",
            lambda: self.core.read_namespaced_service_account("default", name).secrets,
        )

    @staticmethod
    def wait_for(
        what: str,
        fn: Callable[[], T],
        timeout: float = 60.0,
        interval: float = 0.5,
    ) -> T:
        """Poll fn until it returns something truthy (returned); exceptions count as not
        yet. On timeout, fail naming `what` and the last value or error."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = fn()
                if last:
                    return last
            except Exception as e:  # not there yet (404, connection refused, ...)
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}"
                )
            time.sleep(interval)


def prepare_binaries(session: pytest.Session) -> None:
    """Build/fetch the cluster's binaries before any test runs, if e2e tests were selected.

    Called from conftest's pytest_collection_finish, so a cold build (8 minutes on a quiet
    machine, 18 on a busy one) happens outside every test's timeout.
    """
    if not any(item.get_closest_marker("e2e") for item in session.items):
        return
    from shoal.e2e.binaries import ensure_binaries

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            "shoal e2e: preparing the cluster's binaries (cached after the first time)"
        )
    ensure_binaries()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("shoal-cluster")
    state = cluster_mod.up(state_dir)
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH")}
    tool_dirs = [str(Path(state.kubectl).parent), str(Path(state.helm).parent)]
    os.environ["KUBECONFIG"] = state.kubeconfig
    os.environ["PATH"] = os.pathsep.join([*tool_dirs, os.environ.get("PATH", "")])
    api = config.new_client_from_config(config_file=state.kubeconfig)
    try:
        yield Cluster(state=state, api_client=api)
    finally:
        api.close()
        cluster_mod.down(state_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    yield name
    cluster.core.delete_namespace(name)
