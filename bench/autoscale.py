"""SLO autoscaling against a KEDA-like baseline on the local cluster: `python -m bench.autoscale`.

One bursty trace (Gamma-distributed inter-arrival times as BurstGPT measured for LLM
serving, shape < 1 means burstier than Poisson, plus a step burst) is replayed twice against
a tiny-model pool behind the gateway:

- `slo`: Shoal's autoscaler (spec.autoscaling with TTFT/TPOT targets);
- `keda`: what KEDA users configure: a Prometheus scaler on waiting requests with a target
  of 5 per worker (HPA AverageValue: desired = ceil(total waiting / 5)), acting through the
  same scale subresource, same bounds and scale-down stabilization.

Reported per policy: SLO attainment (requests meeting both the TTFT and the TPOT target),
replica-seconds (workers that existed, integrated over the run), failures; and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.loadgen import send_one
from bench.stats import RequestRecord
from bench.workload import BenchRequest

# -- the trace (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceShape:
    duration_s: float = 150.0
    base_rate: float = 1.0  # requests/s outside the burst
    gamma_shape: float = 0.5  # BurstGPT fits shapes below 1 (CV = 1/sqrt(shape) > 1)
    burst_start_s: float = 30.0
    burst_len_s: float = 40.0
    burst_rate: float = 8.0  # requests/s during the step burst


def gamma_arrivals(rate: float, shape: float, start: float, end: float, rng: random.Random):
    """Arrival times in [start, end) with Gamma(shape, 1/(rate*shape)) gaps (mean 1/rate)."""
    out, t = [], start
    while True:
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
        if t >= end:
            return out
        out.append(t)


def bursty_trace(shape: TraceShape, seed: int = 0) -> list[float]:
    """Offsets (s) of every request: the Gamma background plus the step burst, sorted."""
    rng = random.Random(seed)
    times = gamma_arrivals(shape.base_rate, shape.gamma_shape, 0.0, shape.duration_s, rng)
    b0, b1 = shape.burst_start_s, shape.burst_start_s + shape.burst_len_s
    extra = shape.burst_rate - shape.base_rate
    if extra > 0:
        times += gamma_arrivals(extra, shape.gamma_shape, b0, b1, rng)
    return sorted(times)


def keda_desired(total_waiting: float, current: int, lo: int, hi: int, target: float = 5.0):
    """The HPA's AverageValue rule KEDA drives: ceil(total / target), 10 % tolerance."""
    if current > 0 and abs(total_waiting / (current * target) - 1.0) <= 0.1:
        return current
    return min(max(math.ceil(total_waiting / target), lo), hi)


def attainment(records: Sequence[RequestRecord], ttft: float, tpot: float) -> float:
    """Share of requests that succeeded within both targets (failures count as misses)."""
    if not records:
        return 0.0
    ok = [
        r
        for r in records
        if r.error is None and r.ttft <= ttft and (r.tpot is None or r.tpot <= tpot)
    ]
    return len(ok) / len(records)


# -- replay ----------------------------------------------------------------------------------


async def replay(
    base_url: str, model: str, offsets: Sequence[float], prompt: list[int], max_tokens: int
) -> list[RequestRecord]:
    """Send one streaming completion at each offset; one record each, in order."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def at(offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send_one(client, model, BenchRequest(prompt, max_tokens))

        return list(await asyncio.gather(*(at(o) for o in offsets)))


@dataclass
class ReplicaSampler:
    """Counts a pool's worker pods (not terminating... nor yet gone: they cost while they
    drain) once a second in a thread; `replica_seconds` integrates them."""

    count: Callable[[], int]
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # An API hiccup loses one sample; the next one covers it.
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.count()))
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()

    def replica_seconds(self) -> float:
        s = self.samples
        return sum(n * (t1 - t0) for (t0, n), (t1, _) in zip(s, s[1:], strict=False))

    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


# -- the run on the local cluster ------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=150.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--ttft", type=float, default=0.25, help="TTFT target, seconds (p90)")
    p.add_argument("--tpot", type=float, default=0.1, help="TPOT target, seconds (p90)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from bench.autoscale_run import run_both  # the cluster side (imports the e2e harness)

    shape = TraceShape(duration_s=args.duration)
    with tempfile.TemporaryDirectory(prefix="shoal-autoscale-") as tmp:
        results = run_both(Path(tmp), shape, args)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict[str, dict]) -> str:
    slo, keda = results["slo"], results["keda"]
    rows = [
        ("requests", "requests", "{:.0f}"),
        ("SLO attainment", "attainment", "{:.1%}"),
        ("replica-seconds", "replica_seconds", "{:.0f}"),
        ("peak workers", "peak", "{:.0f}"),
        ("failed requests", "failed", "{:.0f}"),
        ("p90 TTFT (s)", "p90_ttft", "{:.3f}"),
    ]
    lines = [
        "| | SLO policy | KEDA-like (waiting/worker > 5) | ratio SLO/KEDA |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        a, b = slo[key], keda[key]
        ratio = f"{a / b:.2f}x" if b else "-"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
