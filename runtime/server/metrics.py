"""The worker's Prometheus metrics (names from DESIGN.md), one registry per app.

Latency histograms are observed from each request's `RequestMetrics` as its outputs
stream; gauges and counters are read from `engine.stats()` at scrape time by a custom
collector, so they are always the engine's own numbers and never drift. Each app owns
its `CollectorRegistry`, so two servers in one process (tests, the gateway beside a
worker) do not clash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.runtime.engine.outputs import EngineStats, RequestMetrics

LABELS = ("model", "pool")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class ServerMetrics:
    """Histograms for one served model; `registry` is what /metrics exposes."""

    def __init__(self, model: str, pool: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"model": model, "pool": pool}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)
            return family.labels(**self.labels)

        self.ttft = histogram(
            "shoal_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "shoal_inter_token_latency_seconds",
            "Time between consecutive engine steps that produced tokens for a request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "shoal_e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            REQUEST_BUCKETS,
        )
        self.queue = histogram(
            "shoal_request_queue_time_seconds",
            "Time a request waited before it was first scheduled.",
            REQUEST_BUCKETS,
        )

    def watch_engine(self, stats: Callable[[], EngineStats | None]) -> None:
        """Expose the engine's gauges and counters, read at every scrape."""
        self.registry.register(EngineStatsCollector(stats, self.labels))

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Observes one request's latencies once each, however many outputs it streams."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._queued = False
        self._first = False
        self._last_token_time: float | None = None
        self._done = False

    def observe(self, m: RequestMetrics | None, finished: bool) -> None:
        if m is None or self._done:
            return
        for sample in request_latencies(m, self._queued, self._first, self._last_token_time):
            name, value = sample
            getattr(self._m, name).observe(value)
        self._queued = self._queued or m.first_scheduled_time is not None
        self._first = self._first or m.first_token_time is not None
        if m.last_token_time is not None:
            self._last_token_time = m.last_token_time
        if finished:
            end = m.finished_time or m.last_token_time
            if end is not None:
                self._m.e2e.observe(max(0.0, end - m.arrival_time))
            self._done = True


def request_latencies(
    m: RequestMetrics, queued: bool, first: bool, prev_token_time: float | None
) -> list[tuple[str, float]]:
    """The latency samples a new output adds, given what was already observed."""
    samples: list[tuple[str, float]] = []
    if not queued and m.first_scheduled_time is not None:
        samples.append(("queue", max(0.0, m.first_scheduled_time - m.arrival_time)))
    if not first and m.first_token_time is not None:
        samples.append(("ttft", max(0.0, m.first_token_time - m.arrival_time)))
    if (
        prev_token_time is not None
        and m.last_token_time is not None
        and m.last_token_time > prev_token_time
    ):
        samples.append(("itl", m.last_token_time - prev_token_time))
    return samples


class EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], labels: dict[str, str]):
        self._stats = stats
        self._names = list(labels)
        self._values = list(labels.values())

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # the model is still loading: nothing to report yet
            return
        gauges = [
            ("shoal_num_requests_running", "Requests in the running batch.", stats.num_running),
            ("shoal_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            (
                "shoal_kv_cache_usage_ratio",
                "Fraction of KV cache blocks in use (0 to 1).",
                stats.kv_cache_usage,
            ),
        ]
        counters = [
            ("shoal_prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            (
                "shoal_generation_tokens",
                "Tokens generated.",
                stats.generation_tokens_total,
            ),
            (
                "shoal_num_preemptions",
                "Requests preempted (KV blocks ran out; recomputed later).",
                stats.num_preemptions_total,
            ),
            (
                "shoal_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits_total,
            ),
            (
                "shoal_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries_total,
            ),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=self._names)
            family.add_metric(self._values, float(value))
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=self._names)
            family.add_metric(self._values, float(value))
            yield family
