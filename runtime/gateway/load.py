"""A worker's load, read from its Prometheus text exposition. Pure."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from shoal.runtime.gateway.routing import WorkerLoad

RUNNING = "shoal_num_requests_running"
WAITING = "shoal_num_requests_waiting"
KV_USAGE = "shoal_kv_cache_usage_ratio"


def parse_worker_load(text: str) -> WorkerLoad:
    """Sum the request gauges and take the highest KV usage over all label sets.

    A worker serves one model, but it may label its series per pool or adapter, so the
    series are folded. Missing gauges read as zero. Raises ValueError on text that is not
    Prometheus exposition format.
    """
    running = waiting = kv = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING:
                running += sample.value
            elif sample.name == WAITING:
                waiting += sample.value
            elif sample.name == KV_USAGE:
                kv = max(kv, sample.value)
    return WorkerLoad(running=running, waiting=waiting, kv_cache_usage=kv)
