"""`shoal operator` command line: arguments and log hygiene (no cluster needed)."""

import argparse
import logging
import subprocess
import sys

import pytest

from shoal.operator import cli


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_watch_everything_with_peering():
    a = parse()
    assert (a.namespace, a.all_namespaces, a.standalone, a.priority) == (None, False, False, None)
    assert a.peering == "shoal-operator" and a.check_model_source is True


def test_namespaces_repeat_and_exclude_all_namespaces():
    assert parse("-n", "a", "--namespace", "b").namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        parse("--namespace", "a", "--all-namespaces")


def test_routine_success_lines_are_dropped_but_others_kept():
    quiet = cli.QuietRoutine()

    def rec(msg):
        return logging.LogRecord("kopf.objects", logging.INFO, "", 0, msg, (), None)

    assert not quiet.filter(rec("Timer 'on_timer' succeeded."))
    assert not quiet.filter(rec("Handler 'on_pod_event' succeeded."))
    assert quiet.filter(rec("Handler 'on_change' succeeded."))
    assert quiet.filter(rec("Timer 'on_timer' failed with an exception and will try again"))


def test_missing_kubeconfig_is_a_clear_error_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "operator", "--kubeconfig", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no Kubernetes configuration" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pool_metrics_follow_the_status_and_are_forgotten():
    from prometheus_client import generate_latest

    from shoal.operator import metrics

    metrics.observe_pool("ns", "m1", 3, {"replicas": 2, "readyReplicas": 1})
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'shoal_operator_pool_workers{deployment="m1",namespace="ns",state="desired"} 3.0' in text
    assert 'shoal_operator_pool_workers{deployment="m1",namespace="ns",state="ready"} 1.0' in text
    metrics.forget_pool("ns", "m1")
    assert 'deployment="m1"' not in generate_latest(metrics.REGISTRY).decode()
