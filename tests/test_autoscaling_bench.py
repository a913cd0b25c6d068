"""bench/autoscale.py's pure parts: the bursty trace, the KEDA-like rule, attainment."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.autoscale import (
    ReplicaSampler,
    TraceShape,
    attainment,
    bursty_trace,
    gamma_arrivals,
    keda_desired,
)
from bench.stats import RequestRecord


def test_gamma_gaps_have_the_rate_and_are_burstier_than_poisson():
    times = gamma_arrivals(4.0, 0.5, 0.0, 5000.0, random.Random(3))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    cv = statistics.stdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(2**0.5, rel=0.1)  # CV = 1/sqrt(shape) > 1 (Poisson: 1)


def test_trace_has_the_step_burst_and_is_seeded():
    shape = TraceShape(duration_s=100, base_rate=1, burst_start_s=40, burst_len_s=20, burst_rate=10)
    t = bursty_trace(shape, seed=7)
    assert t == sorted(t) and t == bursty_trace(shape, seed=7) and t != bursty_trace(shape, 8)
    inside = sum(1 for x in t if 40 <= x < 60)
    assert inside / 20 > 5 * (len(t) - inside) / 80  # the burst is far denser


def test_keda_rule_is_the_hpa_average_value_rule():
    assert keda_desired(0, 2, 1, 5) == 1
    assert keda_desired(12, 1, 1, 5) == 3  # ceil(12 / 5)
    assert keda_desired(10.4, 2, 1, 5) == 2  # within the 10 % tolerance
    assert keda_desired(100, 2, 1, 5) == 5  # clamped


def test_attainment_counts_failures_as_misses():
    ok = RequestRecord(0.0, 0.1, 1.0, 8, 10)  # ttft 0.1, tpot 0.1
    slow = RequestRecord(0.0, 0.6, 1.0, 8, 10)
    failed = RequestRecord(0.0, 0.0, 0.0, 8, 0, error="HTTP 503")
    assert attainment([ok, slow, failed], ttft=0.5, tpot=0.2) == pytest.approx(1 / 3)
    assert attainment([ok], ttft=0.5, tpot=0.05) == 0.0
    assert attainment([], 1, 1) == 0.0


def test_replica_seconds_integrate_the_samples():
    s = ReplicaSampler(lambda: 0)
    s.samples = [(0.0, 1), (10.0, 3), (15.0, 2), (20.0, 2)]
    assert s.replica_seconds() == 1 * 10 + 3 * 5 + 2 * 5
    assert s.peak() == 3
