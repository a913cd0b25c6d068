"""The gateway's per-adapter series (``shoal_gateway_adapter_*``), on the app's registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.runtime.gateway.state import GatewayState

LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Holders(Collector):
    """Workers holding each adapter, read from the live view at scrape time."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shoal_gateway_adapter_workers",
            "Workers of the base model's pool that hold each adapter (as last scraped).",
            labels=["model", "adapter"],
        )
        registry, pools = self._state.adapters, self._state.pools
        for name, base, _ in registry.listed(pools):
            family.add_metric([base, name], len(registry.holders(name)))
        yield family


class AdapterMetrics:
    def __init__(self, registry: CollectorRegistry, state: GatewayState) -> None:
        self.routes = Counter(
            "shoal_gateway_adapter_requests",
            "Adapter requests by how their worker was chosen: holder (it held the adapter), "
            "on_demand (loaded there first), fallback (an on-demand load failed; a holder took it).",
            ["model", "adapter", "route"],
            registry=registry,
        )
        self.loads = Counter(
            "shoal_gateway_adapter_loads",
            "On-demand adapter loads the gateway asked workers for, by result (ok, failed).",
            ["model", "adapter", "result"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "shoal_gateway_adapter_load_seconds",
            "Time a request waited for its adapter to be loaded on demand.",
            ["model", "adapter"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        registry.register(_Holders(state))
