"""The gateway's own Prometheus series (``shoal_gateway_*``).

Each app gets its own registry, so several gateways in one process (tests) do not clash.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.runtime.gateway.adapters_metrics import AdapterMetrics
from shoal.runtime.gateway.state import GatewayState

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _ReadyWorkers(Collector):
    """Reads the live pools at scrape time instead of mirroring them into a gauge."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shoal_gateway_ready_workers", "Routable workers per model.", labels=["model"]
        )
        for model, pool in self._state.pools.items():
            family.add_metric([model], len(pool.workers))
        yield family


class GatewayMetrics:
    def __init__(self, state: GatewayState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shoal_gateway_requests",
            "Requests answered by the gateway, by model and HTTP status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shoal_gateway_request_latency_seconds",
            "Time from request to the end of the response (streams included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "shoal_gateway_upstream_retries",
            "Requests sent again to another worker after one failed before its first byte.",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_ReadyWorkers(state))
        self.adapters = AdapterMetrics(self.registry, state)
