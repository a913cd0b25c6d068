"""The chart's alert rules: promtool checks and unit tests, then the real Prometheus of the
local cluster evaluates them and alerts fire for real (slow tier: needs helm, promtool and
the cluster).

The firing test needs no worker process: an operator whose Prometheus is unreachable runs
an autoscaled ModelDeployment whose model is missing, so the pool has no ready worker and the
autoscaler cannot read metrics, the two conditions two of the alerts exist for.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shoal.e2e.binaries import ensure_binaries
from shoal.e2e.fixtures import NO_PROXY
from tests.e2e.helpers import REPO, ShoalProcess, free_port

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "shoal"
ALERTS = {
    "ShoalSLOBurnRateFast",
    "ShoalSLOBurnRateSlow",
    "ShoalPoolNoReadyWorkers",
    "ShoalQueueGrowing",
    "ShoalMigrationFailures",
    "ShoalAutoscalerMetricsUnavailable",
}


def render_rules(out: Path, *sets: str) -> Path:
    """The chart's PrometheusRule `spec` as a Prometheus rule file."""
    bins = ensure_binaries()
    cmd = [str(bins.helm), "template", "shoal", str(CHART), "-s", "templates/prometheusrule.yaml"]
    cmd += ["--set", "prometheusRule.enabled=true", "--set", "prometheusRule.force=true"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = next(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    out.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))
    return out


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ensure_binaries().promtool), *args], capture_output=True, text=True, timeout=60
    )


def test_chart_renders_no_rule_by_default_and_without_the_crd():
    bins = ensure_binaries()
    cmd = [str(bins.helm), "template", "shoal", str(CHART), "--set", "prometheusRule.enabled=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kind: PrometheusRule" not in proc.stdout  # no monitoring.coreos.com API: skipped
    api = ["--api-versions", "monitoring.coreos.com/v1"]
    proc = subprocess.run([*cmd, *api], capture_output=True, text=True, timeout=60)
    assert "kind: PrometheusRule" in proc.stdout


def test_promtool_check_rules(tmp_path):
    rules = render_rules(tmp_path / "rules.yml")
    proc = promtool("check", "rules", str(rules))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 10 rules found" in proc.stdout
    names = {
        r.get("alert") for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]
    }
    assert names >= ALERTS


UNIT_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  # A pool whose TTFT misses 2.5 s for half of its requests burns its budget fast and slowly;
  # a healthy pool next to it does not.
  - interval: 1m
    input_series:
      - series: 'shoal_time_to_first_token_seconds_bucket{namespace="ns",pool="slow",le="2.5"}'
        values: '0+30x420'
      - series: 'shoal_time_to_first_token_seconds_count{namespace="ns",pool="slow"}'
        values: '0+60x420'
      - series: 'shoal_time_to_first_token_seconds_bucket{namespace="ns",pool="fast",le="2.5"}'
        values: '0+60x420'
      - series: 'shoal_time_to_first_token_seconds_count{namespace="ns",pool="fast"}'
        values: '0+60x420'
    alert_rule_test:
      - eval_time: 70m
        alertname: ShoalSLOBurnRateFast
        exp_alerts:
          - exp_labels: {severity: critical, namespace: ns, pool: slow}
            exp_annotations:
              summary: "Pool ns/slow burns its TTFT error budget fast"
              description: "More than 14.4% of requests miss TTFT 2.5s (objective 0.99); at this rate the budget is gone in about two days."
      - eval_time: 400m
        alertname: ShoalSLOBurnRateSlow
        exp_alerts:
          - exp_labels: {severity: warning, namespace: ns, pool: slow}
            exp_annotations:
              summary: "Pool ns/slow burns its TTFT error budget"
              description: "More than 6% of requests miss TTFT 2.5s over 6 h (objective 0.99)."
  # No ready worker for 5 minutes; a pool that is meant to be at zero is fine.
  - interval: 1m
    input_series:
      - series: 'shoal_operator_pool_workers{namespace="ns",deployment="down",state="desired"}'
        values: '2x10'
      - series: 'shoal_operator_pool_workers{namespace="ns",deployment="down",state="ready"}'
        values: '0x10'
      - series: 'shoal_operator_pool_workers{namespace="ns",deployment="zero",state="desired"}'
        values: '0x10'
      - series: 'shoal_operator_pool_workers{namespace="ns",deployment="zero",state="ready"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 3m
        alertname: ShoalPoolNoReadyWorkers
        exp_alerts: []
      - eval_time: 6m
        alertname: ShoalPoolNoReadyWorkers
        exp_alerts:
          - exp_labels: {severity: critical, namespace: ns, deployment: down}
            exp_annotations:
              summary: "ModelDeployment ns/down has no ready worker"
              description: "Its model is unavailable. See kubectl describe mdep down -n ns (conditions and events say why)."
  # A queue that keeps growing past the threshold; a long but shrinking one does not alert.
  - interval: 1m
    input_series:
      - series: 'shoal_num_requests_waiting{namespace="ns",pool="grow",pod="a"}'
        values: '0+2x30'
      - series: 'shoal_num_requests_waiting{namespace="ns",pool="drain",pod="b"}'
        values: '90-2x30'
    alert_rule_test:
      - eval_time: 25m
        alertname: ShoalQueueGrowing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: ns, pool: grow}
            exp_annotations:
              summary: "Requests keep piling up in pool ns/grow"
              description: "50 waiting requests and rising: the pool is short of workers (at maxReplicas, or not autoscaled)."
  - interval: 1m
    input_series:
      - series: 'shoal_migrations_total{namespace="ns",pool="p",pod="a",outcome="aborted",reason="target_full"}'
        values: '0 0 1 2 3 4 5 6 7 8 9 10'
      - series: 'shoal_migrations_total{namespace="ns",pool="p",pod="a",outcome="succeeded",reason=""}'
        values: '0+5x11'
    alert_rule_test:
      - eval_time: 10m
        alertname: ShoalMigrationFailures
        exp_alerts:
          - exp_labels: {severity: warning, namespace: ns, pool: p}
            exp_annotations:
              summary: "Request migrations fail in pool ns/p"
              description: "More than 0 migrations aborted in 15m: drains and rebalancing fall back to waiting or recomputing."
  - interval: 1m
    input_series:
      - series: 'shoal_operator_autoscaler_metrics_available{namespace="ns",deployment="d"}'
        values: '1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 4m
        alertname: ShoalAutoscalerMetricsUnavailable
        exp_alerts: []
      - eval_time: 8m
        alertname: ShoalAutoscalerMetricsUnavailable
        exp_alerts:
          - exp_labels: {severity: warning, namespace: ns, deployment: d}
            exp_annotations:
              summary: "The autoscaler cannot read metrics for ns/d"
              description: "It holds the replica count (no scaling in either direction) until Prometheus answers; the MetricsAvailable condition says why."
"""


def test_promtool_unit_tests(tmp_path):
    render_rules(tmp_path / "rules.yml")
    (tmp_path / "tests.yml").write_text(textwrap.dedent(UNIT_TESTS))
    proc = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# -- the real Prometheus ------------------------------------------------------------------


@pytest.fixture
def alerting_prometheus(cluster, tmp_path) -> Iterator[Path]:
    """The cluster's Prometheus with the chart's rules loaded (short `for`), restored after."""
    rules = render_rules(
        tmp_path / "rules.yml",
        "prometheusRule.for.noReadyWorkers=10s",
        "prometheusRule.for.autoscalerMetrics=10s",
    )
    yield rules
    cluster.reconfigure_prometheus()


def loaded_rules(cluster) -> list[dict]:
    """Every rule Prometheus has loaded, with its health (GET /api/v1/rules)."""
    with NO_PROXY.open(f"{cluster.prometheus_url}/api/v1/rules", timeout=5) as r:
        groups = json.loads(r.read())["data"]["groups"]
    return [rule for g in groups for rule in g["rules"]]


def firing(cluster) -> dict[str, dict]:
    return {
        a["metric"]["alertname"]: a["metric"]
        for a in cluster.prometheus_query('ALERTS{alertstate="firing"}')
    }


def test_alerts_fire_in_the_real_prometheus(
    cluster, crds, namespace, alerting_prometheus, tmp_path
):
    metrics = f"127.0.0.1:{free_port()}"
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: Prometheus "down" for it
    op = ShoalProcess(
        [
            "operator", "--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace,
            "--standalone", "--liveness", liveness, "--metrics", metrics,
            "--prometheus-url", dead,
        ],
        tmp_path / "operator.log",
    )  # fmt: skip
    try:
        cluster.wait_for("the operator's liveness endpoint", lambda: op.get(liveness) == 200)
        # The operator runs beside the cluster, not in a pod: scrape it with a static job
        # (honor_labels keeps the ModelDeployment's namespace label, as the chart documents).
        job = {
            "job_name": "shoal-operator",
            "honor_labels": True,
            "scrape_interval": "2s",
            "static_configs": [{"targets": [metrics]}],
        }
        cluster.reconfigure_prometheus([job], [alerting_prometheus])
        manifest = {
            "apiVersion": "shoal.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "nomodel"},
            "spec": {
                "model": {"name": "m", "source": str(tmp_path / "no-such-model")},
                "replicas": 2,
                "autoscaling": {"maxReplicas": 3, "slo": {"ttft": {"target": 0.5}}},
            },
        }
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        got = cluster.wait_for(
            "ShoalPoolNoReadyWorkers and ShoalAutoscalerMetricsUnavailable firing",
            lambda: (
                f
                if {"ShoalPoolNoReadyWorkers", "ShoalAutoscalerMetricsUnavailable"}
                <= set(f := firing(cluster))
                else None
            ),
            timeout=90,
            interval=2,
        )
        for name in ("ShoalPoolNoReadyWorkers", "ShoalAutoscalerMetricsUnavailable"):
            assert got[name]["namespace"] == namespace and got[name]["deployment"] == "nomodel"
        # Every rule of the chart was loaded and evaluates without error.
        rules = loaded_rules(cluster)
        assert {r["name"] for r in rules if r["type"] == "alerting"} >= ALERTS
        assert [r for r in rules if r.get("health") != "ok"] == []
    finally:
        cluster.kubectl("delete", "mdep", "nomodel", "-n", namespace, "--wait=false", check=False)
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()[-3000:]}")
