"""The adapter series on the worker's /metrics, read from the pool at scrape time.

Per adapter (labels model, pool, adapter): requests, prompt and generated tokens,
running sequences. Per worker (labels model, pool): resident and host-cached adapter
counts, swap-ins (loads) and evictions from the resident slots, and the seconds a
swap-in takes (copying the weights into a slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class LoRACollector(Collector):
    def __init__(self, pool: Callable[[], Any], labels: dict[str, str]):
        self._pool = pool
        self._names = list(labels)
        self._values = list(labels.values())

    def collect(self) -> Iterator[Metric]:
        pool = self._pool()
        if pool is None:
            return
        stats = pool.stats()
        names, values = self._names, self._values
        per_adapter = [*names, "adapter"]
        counters = stats["counters"]
        for name, doc, field in (
            ("shoal_lora_requests", "Requests served with each adapter.", "requests"),
            ("shoal_lora_prompt_tokens", "Prompt tokens per adapter.", "prompt_tokens"),
            ("shoal_lora_generation_tokens", "Tokens generated per adapter.", "generation_tokens"),
        ):
            family = CounterMetricFamily(name, doc, labels=per_adapter)
            for adapter, c in sorted(counters.items()):
                family.add_metric([*values, adapter], float(getattr(c, field)))
            yield family
        running = GaugeMetricFamily(
            "shoal_lora_requests_running",
            "Sequences running with each adapter.",
            labels=per_adapter,
        )
        for adapter, n in sorted(stats["running"].items()):
            running.add_metric([*values, adapter], float(n))
        yield running
        for name, doc, value in (
            (
                "shoal_lora_adapters_resident",
                "Adapters in the resident slots the batch reads.",
                stats["resident"],
            ),
            (
                "shoal_lora_adapters_cpu_cached",
                "Adapters kept in host memory.",
                stats["cpu_cached"],
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, float(value))
            yield gauge
        for name, doc, value in (
            ("shoal_lora_loads", "Adapters swapped into a resident slot.", stats["loads_total"]),
            (
                "shoal_lora_evictions",
                "Idle adapters evicted from a resident slot to make room.",
                stats["evictions_total"],
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, float(value))
            yield counter
        histogram = HistogramMetricFamily(
            "shoal_lora_swap_seconds",
            "Seconds to copy an adapter's weights into a resident slot.",
            labels=names,
        )
        histogram.add_metric(values, stats["swap_seconds"], stats["swap_seconds_sum"])
        yield histogram
