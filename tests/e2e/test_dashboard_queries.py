"""Every panel of the chart's Grafana dashboards, run against the real Prometheus of the
local cluster after real load (slow tier).

The chart is rendered with helm; every query of every panel and annotation is sent to
Prometheus with the dashboard variables set to the test's pool. A query Prometheus rejects
fails the test; so does an empty answer, except for the series that only exist after traffic
this test does not make (request migrations: a drain by migration), which must still be
valid queries and are listed in the output.

The pool: one tiny-Llama worker serving two LoRA adapters over one resident slot (so they
swap), the gateway in front, the operator's metrics scraped by a static job. After the load
the pool is held at 2 until Prometheus has seen it, then the idle pool's autoscaler scales
it back to 1, so the replica and scale-event series move.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import yaml

from bench.autoscale import replay
from shoal.e2e.binaries import ensure_binaries
from shoal.e2e.fixtures import NO_PROXY
from tests.e2e.helpers import REPO, ShoalProcess, free_port

pytestmark = pytest.mark.e2e

NAME, MODEL, ADAPTERS = "dash", "tiny-dash", ("dash-lora", "dash-lora-b")
WORKER_TIMEOUT = 240.0
PROMPT = list(range(10, 42))
# Series that exist only after a request migration (a drain by migration): checked for
# validity, allowed to be empty here.
NEEDS_MIGRATION = ("shoal_migration", "shoal_worker_draining", "shoal_operator_drains")


def rendered_dashboards() -> dict[str, dict]:
    cmd = [str(ensure_binaries().helm), "template", "shoal", str(REPO / "charts" / "shoal")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for doc in yaml.safe_load_all(proc.stdout):
        if (
            doc
            and doc["kind"] == "ConfigMap"
            and doc["metadata"]["labels"].get("grafana_dashboard") == "1"
        ):
            for key, text in doc["data"].items():
                out[key] = json.loads(text)
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), expr)


def query(url: str, promql: str) -> tuple[str, int]:
    """(error or "", number of samples that are numbers) of an instant query: a quantile of
    a histogram with no observation is NaN, which a panel shows as nothing."""
    full = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with NO_PROXY.open(full, timeout=10) as r:
            body = json.loads(r.read())
    except Exception as e:  # 400/422: the query is invalid
        return f"{e}: {getattr(e, 'read', lambda: b'')().decode(errors='replace')}", 0
    if body.get("status") != "success":
        return str(body.get("error")), 0
    return "", sum(1 for r in body["data"]["result"] if r["value"][1] != "NaN")


@pytest.fixture(scope="module")
def loaded_pool(cluster, crds, tiny_model, tmp_path_factory) -> Iterator[str]:
    from shoal.runtime.testing.adapters import make_tiny_adapter

    tmp = tmp_path_factory.mktemp("dash")
    adapters = [
        make_tiny_adapter(tiny_model, tmp / name, rank=4, seed=i) for i, name in enumerate(ADAPTERS)
    ]
    ns = "dashboards-e2e"
    cluster.create_namespace(ns)
    metrics = f"127.0.0.1:{free_port()}"
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    op = ShoalProcess(
        [
            "operator", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
            "--standalone", "--liveness", liveness, "--metrics", metrics,
            "--prometheus-url", cluster.prometheus_url,
        ],
        tmp / "operator.log",
    )  # fmt: skip
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    gw = ShoalProcess(
        [
            "gateway", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
            "--host", "127.0.0.1", "--port", str(port), "--scrape-interval", "0.5",
        ],
        tmp / "gateway.log",
    )  # fmt: skip
    try:
        cluster.wait_for("the operator", lambda: op.get(liveness) == 200)
        cluster.wait_for("the gateway", lambda: gw.get(f"{gateway}/health") == 200)
        # The operator and gateway run beside the cluster: scrape them with static jobs.
        cluster.reconfigure_prometheus(
            [
                {
                    "job_name": "shoal-operator",
                    "honor_labels": True,
                    "scrape_interval": "2s",
                    "static_configs": [{"targets": [metrics]}],
                },
                {
                    "job_name": "shoal-gateway",
                    "scrape_interval": "2s",
                    "static_configs": [{"targets": [gateway.removeprefix("http://")]}],
                },
            ]
        )
        manifest = {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME},
            "spec": {
                "model": {"name": MODEL, "source": tiny_model},
                "replicas": 1,
                "runtime": {
                    "engine": {"numKvBlocks": 64, "maxNumSeqs": 4},
                    # Two adapters over one resident slot: every switch is a swap-in, so the
                    # swap series move while Prometheus watches.
                    "args": [
                        *(f"--lora={n}={p}" for n, p in zip(ADAPTERS, adapters, strict=True)),
                        "--max-lora-rank=8",
                        "--max-loras=1",
                    ],
                },
                "autoscaling": {
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "slo": {"ttft": {"target": 0.5}, "tpot": {"target": 0.1}},
                    "intervalSeconds": 2,
                    "windowSeconds": 10,
                    # Long enough for the scaled-up spec to be scraped (a scale event).
                    "scaleDown": {"stabilizationWindowSeconds": 10},
                    "cooldownSeconds": 0,
                },
            },
        }
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))
        cluster.wait_for(
            "the pool's worker behind the gateway",
            lambda: "shoal_gateway_ready_workers" in _ready_line(gw, gateway),
            timeout=WORKER_TIMEOUT,
        )
        # Real load: base model and both adapters, streamed, twice with scrapes in between so
        # every rate() has two samples of change.
        for _ in range(2):
            for model in (MODEL, *ADAPTERS):
                records = asyncio.run(
                    replay(gateway, model, [i * 0.1 for i in range(12)], PROMPT, 8)
                )
                assert [r.error for r in records if r.error] == []
            time.sleep(4)
        # A scale event Prometheus sees: hold 2 replicas (minReplicas 2) until a scrape of the
        # operator shows it, then let the idle pool's autoscaler take it back to 1.
        hold = {"spec": {"replicas": 2, "autoscaling": {"minReplicas": 2}}}
        cluster.kubectl("patch", "mdep", NAME, "-n", ns, "--type=merge", "-p", json.dumps(hold))
        seen_two = (
            f'shoal_operator_pool_workers{{namespace="{ns}",deployment="{NAME}",state="desired"}}'
            " == 2"
        )
        cluster.wait_for(
            "Prometheus to see the pool at 2",
            lambda: query(cluster.prometheus_url, seen_two)[1] > 0,
            timeout=60,
        )
        release = {"spec": {"autoscaling": {"minReplicas": 1}}}
        cluster.kubectl("patch", "mdep", NAME, "-n", ns, "--type=merge", "-p", json.dumps(release))
        cluster.wait_for(
            "the autoscaler to scale the idle pool back to 1",
            lambda: (
                (_mdep(cluster, ns).get("status", {}).get("autoscaling") or {})
                .get("lastScale", {})
                .get("from")
                == 2
            ),
            timeout=120,
        )
        time.sleep(6)  # two scrapes after the last change
        yield ns
    finally:
        cluster.kubectl("delete", "mdep", NAME, "-n", ns, "--wait=false", check=False)
        cluster.reconfigure_prometheus()
        for p in (gw, op):
            p.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-2000:]}")
        cluster.core.delete_namespace(ns)


def _mdep(cluster, ns: str) -> dict:
    out = cluster.kubectl("get", "mdep", NAME, "-n", ns, "-o", "json")
    return json.loads(out)


def _ready_line(gw: ShoalProcess, gateway: str) -> str:
    with NO_PROXY.open(f"{gateway}/metrics", timeout=5) as r:
        text = r.read().decode()
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith("shoal_gateway_ready_workers")
        and MODEL in line
        and not line.endswith(" 0.0")
    )


def test_every_panel_query_is_valid_and_returns_data(cluster, loaded_pool):
    boards = rendered_dashboards()
    assert set(boards) == {"shoal-model.json", "shoal-fleet.json"}
    values = {
        "namespace": loaded_pool,
        "pool": NAME,
        "__rate_interval": "1m",
        "__interval": "1m",
        "ttft_slo": "2.5",
        "tpot_slo": "0.3",
    }
    invalid, empty, allowed_empty, checked = [], [], [], 0
    for file, board in boards.items():
        targets = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
        targets += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if a.get("expr")]
        for title, expr in targets:
            promql = substitute(expr, values)
            assert "$" not in promql, f"{file} {title}: unsubstituted variable in {promql}"
            error, n = query(cluster.prometheus_url, promql)
            checked += 1
            if error:
                invalid.append(f"{file} / {title}: {promql}: {error}")
            elif n == 0:
                (allowed_empty if any(s in promql for s in NEEDS_MIGRATION) else empty).append(
                    f"{file} / {title}: {promql}"
                )
    print(f"\n{checked} queries run; empty for want of migration traffic ({len(allowed_empty)}):")
    print("\n".join(f"  {q}" for q in allowed_empty))
    assert invalid == []
    assert empty == []
    assert checked >= 45
