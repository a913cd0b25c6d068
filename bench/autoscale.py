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
    burst_rate: float = 10.0  # requests/s during the step burst


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

NAMESPACE = "bench"
MODEL = "tiny-bench"
PROMPT = list(range(10, 138))  # 128 prompt tokens
DOWN_WINDOW_S = 30.0  # scale-down stabilization, the same for both policies
TAIL_S = 45.0  # measured after the trace too: the scale-in is part of the cost


def _kubectl(state, *args: str, input: str | None = None) -> str:
    import subprocess

    cmd = [state.kubectl, f"--kubeconfig={state.kubeconfig}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _wait(what: str, check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def _manifest(name: str, model: Path, args: argparse.Namespace, slo: bool) -> dict:
    spec: dict = {
        "model": {"name": MODEL, "source": str(model)},
        "replicas": 1,
        "runtime": {"engine": {"numKvBlocks": 256, "maxNumSeqs": args.max_num_seqs}},
    }
    if slo:
        spec["autoscaling"] = {
            "minReplicas": 1,
            "maxReplicas": args.max_replicas,
            "slo": {
                "ttft": {"target": args.ttft, "percentile": 90},
                "tpot": {"target": args.tpot, "percentile": 90},
            },
            "guards": {"maxWaitingPerReplica": 4},
            "windowSeconds": 10,
            "intervalSeconds": 2,
            "scaleDown": {"stabilizationWindowSeconds": DOWN_WINDOW_S},
            "cooldownSeconds": 5,
            "maxStep": 2,
        }
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


class KedaLike:
    """The baseline controller: every 2 s, Prometheus's total waiting requests of the pool
    -> keda_desired -> the scale subresource; a scale-down only when every desired value of
    the last DOWN_WINDOW_S agreed (the HPA's stabilization), like the SLO policy's."""

    def __init__(self, state, name: str, lo: int, hi: int) -> None:
        from kubernetes import client, config

        from shoal.operator.prometheus import Prometheus

        self.api = client.CustomObjectsApi(config.new_client_from_config(state.kubeconfig))
        self.prom = Prometheus(state.prometheus_url)
        self.name, self.lo, self.hi = name, lo, hi
        self.history: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def _current(self) -> int:
        obj = self.api.get_namespaced_custom_object(
            "shoal.dev", "v1alpha1", NAMESPACE, "modeldeployments", self.name
        )
        return int(obj["spec"]["replicas"])

    def step(self) -> None:
        sel = f'namespace="{NAMESPACE}",pool="{self.name}"'
        waiting = self.prom.scalar(f"sum(shoal_num_requests_waiting{{{sel}}})")
        if waiting is None:
            return  # no data: hold, as KEDA does with a failing scaler (fallback off)
        now, current = time.monotonic(), self._current()
        want = keda_desired(waiting, current, self.lo, self.hi)
        self.history = [(t, d) for t, d in self.history if now - t <= DOWN_WINDOW_S]
        self.history.append((now, want))
        if want < current:
            want = max(d for _, d in self.history)
        if want != current:
            self.api.patch_namespaced_custom_object_scale(
                "shoal.dev", "v1alpha1", NAMESPACE, "modeldeployments", self.name,
                {"spec": {"replicas": want}},
            )  # fmt: skip

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.step()
            self._stop.wait(2.0)

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def run_policy(state, model: Path, gateway: str, policy: str, args, offsets) -> dict:
    from kubernetes import client, config

    from bench.stats import percentile

    name = f"bench-{policy}"
    core = client.CoreV1Api(config.new_client_from_config(state.kubeconfig))

    def workers() -> int:
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"shoal.dev/deployment={name}")
        return len(pods.items)

    def ready() -> int:
        obj = json.loads(_kubectl(state, "get", "mdep", name, "-n", NAMESPACE, "-o", "json"))
        return int(obj.get("status", {}).get("readyReplicas") or 0)

    manifest = _manifest(name, model, args, slo=policy == "slo")
    _kubectl(state, "apply", "-f", "-", input=json.dumps(manifest))
    _wait(f"{name}: 1 ready worker", lambda: ready() == 1, 600)
    _wait(f"{name}: the gateway routes to it", lambda: _serves(gateway), 120)
    asyncio.run(replay(gateway, MODEL, [0.0] * 4, PROMPT, 4))  # warm-up
    time.sleep(12)  # the warm-up leaves the rate window before the trace starts
    baseline = KedaLike(state, name, 1, args.max_replicas) if policy == "keda" else None
    sampler = ReplicaSampler(workers)
    sampler.start()
    if baseline:
        baseline.start()
    print(f"[{policy}] replaying {len(offsets)} requests over {offsets[-1]:.0f} s", flush=True)
    records = asyncio.run(replay(gateway, MODEL, offsets, PROMPT, args.max_tokens))
    time.sleep(TAIL_S)
    sampler.stop()
    if baseline:
        baseline.stop()
    _kubectl(state, "delete", "mdep", name, "-n", NAMESPACE, "--wait=false")
    _wait(f"{name}: workers gone", lambda: workers() == 0, 180)
    ok = [r for r in records if r.error is None]
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "attainment": attainment(records, args.ttft, args.tpot),
        "replica_seconds": sampler.replica_seconds(),
        "peak": sampler.peak(),
        "p90_ttft": percentile([r.ttft for r in ok], 90) if ok else float("nan"),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def _serves(gateway: str) -> bool:
    with httpx.Client(timeout=10, trust_env=False) as c:
        r = c.post(
            f"{gateway}/v1/completions",
            json={"model": MODEL, "prompt": PROMPT[:8], "max_tokens": 2},
        )
        return r.status_code == 200


def run_both(tmp: Path, shape: TraceShape, args: argparse.Namespace) -> dict[str, dict]:
    """A fresh local cluster, the operator and gateway, then each policy on the same trace."""
    from shoal.e2e import cluster, procs
    from shoal.runtime.testing import make_tiny_model

    state = cluster.up(tmp / "cluster")
    try:
        _kubectl(state, "apply", "-f", str(Path(__file__).resolve().parents[1] / "crds"))
        # kubectl 1.20's wait fails at once on a CRD with no conditions yet: poll instead.
        _wait("the CRD established", lambda: "Established" in _kubectl(
            state, "get", "crd", "modeldeployments.shoal.dev",
            "-o", "jsonpath={.status.conditions[*].type}",
        ), 60)  # fmt: skip
        _kubectl(state, "create", "namespace", NAMESPACE)
        model = make_tiny_model("llama", tmp / "tiny-llama")
        op_port, gw_port = procs.free_port(), procs.free_port()
        shoal = [sys.executable, "-m", "shoal.cli"]
        cluster.start_extra(state, "operator", [
            *shoal, "operator", "--kubeconfig", state.kubeconfig, "--namespace", NAMESPACE,
            "--standalone", "--liveness", f"http://127.0.0.1:{op_port}/healthz",
            "--prometheus-url", state.prometheus_url,
        ])  # fmt: skip
        gateway = f"http://127.0.0.1:{gw_port}"
        cluster.start_extra(state, "gateway", [
            *shoal, "gateway", "--kubeconfig", state.kubeconfig, "--namespace", NAMESPACE,
            "--host", "127.0.0.1", "--port", str(gw_port), "--scrape-interval", "0.5",
        ])  # fmt: skip
        _wait("the operator", lambda: procs.http_ok(f"http://127.0.0.1:{op_port}/healthz"), 120)
        _wait("the gateway", lambda: procs.http_ok(f"{gateway}/health"), 120)
        offsets = bursty_trace(shape, seed=args.seed)
        return {p: run_policy(state, model, gateway, p, args, offsets) for p in ("slo", "keda")}
    finally:
        cluster.down(tmp / "cluster")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=150.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--base-rate", type=float, default=TraceShape.base_rate, help="requests/s")
    p.add_argument("--burst-rate", type=float, default=TraceShape.burst_rate, help="requests/s")
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--ttft", type=float, default=0.3, help="TTFT target, seconds (p90)")
    p.add_argument("--tpot", type=float, default=0.1, help="TPOT target, seconds (p90)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=2,
        help="batch slots per worker: few slots make a worker's capacity its slots, not the "
        "CPU the workers share on one machine, so that a replica adds capacity as on GPUs",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    shape = TraceShape(
        duration_s=args.duration, base_rate=args.base_rate, burst_rate=args.burst_rate
    )
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
