"""The chart's Grafana dashboards, read as files (the e2e tier runs every query for real)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "charts/shoal/dashboards").glob("*.json"))
TEMPLATE = ROOT / "charts/shoal/templates/dashboards.yaml"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
# Every series a dashboard may read: the workers', the gateway's, the operator's (with the
# autoscaler's), and the LoRA/migration names of the runtime contract.
KNOWN_PREFIXES = ("shoal_", "shoal:")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def exprs(board: dict) -> list[str]:
    out = [t["expr"] for p in panels(board) for t in p["targets"]]
    out += [a["expr"] for a in board["annotations"]["list"] if a.get("expr")]
    return out


def test_two_dashboards_with_unique_uids():
    boards = [load(p) for p in DASHBOARDS]
    assert {b["uid"] for b in boards} == {"shoal-model", "shoal-fleet"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_queries_prometheus_through_the_datasource_variable(path: Path):
    board = load(path)
    defined = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in defined
    for p in panels(board):
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
    for e in exprs(board):
        used = set(re.findall(r"\$(\w+)", e))
        assert used <= defined | GRAFANA_BUILTINS, f"undefined variable in {e}"
        names = re.findall(r"\b(shoal[_:][a-z_:0-9]+)", e)
        assert names, f"{e} reads no shoal series"
        assert all(n.startswith(KNOWN_PREFIXES) for n in names)


def test_model_dashboard_covers_the_slo_story():
    board = load(ROOT / "charts/shoal/dashboards/shoal-model.json")
    text = "\n".join(exprs(board))
    for series in (
        "shoal_time_to_first_token_seconds_bucket",
        "shoal_inter_token_latency_seconds_bucket",
        "shoal_operator_autoscaler_target_seconds",  # the SLO target line
        "shoal_generation_tokens_total",
        "shoal_num_requests_waiting",
        "shoal_kv_cache_usage_ratio",
        "shoal_operator_pool_workers",
        "shoal_operator_autoscaler_desired_replicas",
        "shoal_lora_requests_total",
        "shoal_lora_swap_seconds_bucket",
        "shoal_migrations_total",
        "shoal_migration_downtime_seconds_bucket",
        "shoal_operator_drains_total",
    ):
        assert series in text, series
    # Attainment reads the bucket at the chosen SLO bound; the choices are real bucket bounds.
    from shoal.runtime.server.metrics import ITL_BUCKETS, TTFT_BUCKETS

    choices = {v["name"]: v for v in board["templating"]["list"]}
    for name, buckets in (("ttft_slo", TTFT_BUCKETS), ("tpot_slo", ITL_BUCKETS)):
        values = [o["value"] for o in choices[name]["options"]]
        assert values and all(float(v) in buckets for v in values)
        # Written as the Python client writes `le` (1.0, not 1).
        assert all(v == repr(float(v)) for v in values)
    assert any(a.get("name") == "Scale events" for a in board["annotations"]["list"])


def test_operator_series_in_the_dashboards_exist():
    """Operator series the dashboards read are registered by the operator (no typos)."""
    from shoal.operator import autoscaler  # noqa: F401  (registers shoal_operator_autoscaler_*)
    from shoal.operator.metrics import REGISTRY

    registered = {s.name for m in REGISTRY.collect() for s in m.samples} | {
        m.name for m in REGISTRY.collect()
    }
    text = "\n".join(e for p in DASHBOARDS for e in exprs(load(p)))
    used = set(
        re.findall(r"\b(shoal_operator_autoscaler_[a-z_]+|shoal_operator_pool_workers)", text)
    )
    for name in used:
        base = re.sub(r"_total$", "", name)
        assert name in registered or base in registered, name


def test_configmaps_carry_the_sidecar_label_from_values():
    text = TEMPLATE.read_text()
    assert ".Values.dashboards.label" in text and ".Values.dashboards.labelValue" in text
    assert '.Files.Glob "dashboards/*.json"' in text
