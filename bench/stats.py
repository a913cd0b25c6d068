"""Statistics of a benchmark run: pure functions, no I/O, no clocks.

A run is a list of `RequestRecord`s (timestamps taken by whoever drove the engine); the
summary is what the table prints. Definitions follow vLLM's `benchmark_serving` so the
numbers are comparable with what vLLM users know:
- TTFT: first output token's arrival minus the request's send time.
- TPOT: (last token - first token) / (output tokens - 1), per request (decode speed as
  that request saw it, queueing between its tokens included).
- throughput: all output tokens / (last finish - first send).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    sent: float  # seconds, any monotonic clock
    first_token: float
    finished: float
    prompt_tokens: int
    output_tokens: int
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None  # one token has no inter-token time
        return (self.finished - self.first_token) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    output_tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default (`method="linear"`), written out so the bench's
    math is readable and tested on its own.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Send times (seconds from start) of `count` requests arriving as a Poisson process.

    Inter-arrival gaps are exponential with mean 1/rate; the first request goes at 0 so
    a run never starts with dead time.
    """
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(count - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times[:count]


def summarize(records: Sequence[RequestRecord]) -> Summary:
    """Throughput and latency percentiles over the successful requests."""
    ok = [r for r in records if r.error is None]
    if not ok:
        raise ValueError("no request succeeded; nothing to summarize")
    start = min(r.sent for r in ok)
    end = max(r.finished for r in ok)
    duration = end - start
    out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None] or [0.0]
    return Summary(
        requests=len(records),
        failed=len(records) - len(ok),
        duration_s=duration,
        output_tokens=out,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tok_s=out / duration if duration > 0 else float("nan"),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99),
    )
