"""`python -m bench.migration`: live migration downtime against context length.

Two `shoal serve` workers (separate processes, as in a pool) serve the bench Llama
(preset `bench-llama`, its context stretched a little so 4096 tokens plus the output
fit). For each context length, one streaming request runs on worker A; after a few
tokens the bench calls A's Migrate RPC to move it to worker B, either staged (KV blocks copied while it decodes, then a short
stop-and-copy) or by recompute (state only, B prefills the whole context again, the
baseline). The client follows the stream like the gateway does and timestamps every
token, so the downtime measured is what a client sees: the gap between the last token
from A and the first from B. The decode step is measured in the same run (median gap
between tokens before the migration), and downtime is also given in decode steps.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from bench.serving import cache_dir, log
from shoal.runtime.migration import migration_pb2 as pb
from shoal.runtime.migration import migration_pb2_grpc as pb_grpc

CONTEXTS = (128, 512, 1024, 2048, 4096)
MODES = ("staged", "recompute")
MAX_POSITIONS = 4096 + 256  # the bench-llama context, stretched so 4096 + output fits


@dataclass
class Run:
    context: int
    mode: str
    ok: bool
    reason: str
    step_s: float  # median decode step before the migration
    gap_s: float  # client-seen: last token from the source -> first from the target
    downtime_s: float  # worker-seen: paused -> handed off (staged); same for recompute
    total_s: float  # the whole migration, reservation to hand-off
    bytes: int
    exact: bool  # the migrated output equals the unmigrated one


class Worker:
    """A `shoal serve` process on loopback, with its HTTP and gRPC ports."""

    def __init__(self, args: list[str], log_path: Path):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "shoal"), "serve", *args, "--host", "127.0.0.1",
             "--port", str(self.port), "--grpc-port", str(self.grpc_port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.stub = pb_grpc.MigrationStub(grpc.insecure_channel(self.grpc_target))

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited; see {self._log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).is_success:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the worker was not ready in {timeout} s; see {self._log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stream:
    times: list[float] = field(default_factory=list)  # arrival of each token event
    hop_index: int = -1  # index in `times` of the first token after the move
    text: str = ""


def bench_model(dtype: str) -> Path:
    from shoal.runtime.testing import PRESETS, make_tiny_model

    preset = {**PRESETS["bench-llama"], "max_position_embeddings": MAX_POSITIONS}
    key = hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest()[:8]
    path = cache_dir() / "models" / f"bench-llama-long-{dtype}-{key}"
    if not (path / "shoal-tiny.json").exists():
        log(f"writing the bench Llama ({dtype}, {MAX_POSITIONS} positions) to {path}")
        make_tiny_model(
            "llama", path, preset="bench-llama", dtype=dtype, max_position_embeddings=MAX_POSITIONS
        )
    return path


def read_stream(base_url: str, body: dict, on_token, at_token: int, warm: str = "") -> Stream:
    """Stream a completion, following the migration marker; on_token(request_id) runs
    in a thread once `at_token` tokens have arrived. `warm`: a worker the client opens a
    connection to first, as the gateway holds pooled connections to its workers."""
    from shoal.runtime.migration import marker

    out = Stream()
    fired = False
    url, payload = f"{base_url}/v1/completions", body
    with httpx.Client(timeout=600, trust_env=False) as client:
        if warm:
            client.get(f"{warm}/health")
        while True:
            moved = None
            with client.stream("POST", url, json=payload) as response:
                response.raise_for_status()
                rid = response.headers["x-request-id"]
                events = marker.SSEEvents()
                for chunk in response.iter_raw():
                    for event in events.feed(chunk):
                        moved = marker.parse_event(event)
                        if moved is not None:
                            break
                        data = event.decode().removeprefix("data: ").strip()
                        if data == "[DONE]":
                            continue
                        now = time.perf_counter()
                        for choice in json.loads(data)["choices"]:
                            out.text += choice["text"]
                            out.times.append(now)
                        if not fired and len(out.times) >= at_token:
                            fired = True
                            threading.Thread(target=on_token, args=(rid,), daemon=True).start()
                    if moved is not None:
                        break
            if moved is None:
                return out
            out.hop_index = len(out.times)
            url, payload = moved


def one_run(
    a: Worker, b: Worker, prompt: list[int], mode: str, max_tokens: int, at_token: int
) -> Run:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    reference = read_stream(a.url, body, lambda rid: None, max_tokens + 1)
    outcomes = []
    done = threading.Event()

    def move(rid: str) -> None:
        started = time.perf_counter()
        request = pb.MigrateRequest(
            request_id=rid, target=b.grpc_target, max_stages=4, recompute=(mode == "recompute")
        )
        reply = a.stub.Migrate(request, timeout=600)
        outcomes.append((reply, time.perf_counter() - started))
        done.set()

    got = read_stream(a.url, body, move, at_token, warm=b.url)
    done.wait(600)
    o, total = outcomes[0]
    before = [
        t1 - t0 for t0, t1 in zip(got.times[1:at_token], got.times[2 : at_token + 1], strict=True)
    ]
    step = statistics.median(before) if before else float("nan")
    gap = float("nan")
    if o.ok and 0 < got.hop_index < len(got.times):
        gap = got.times[got.hop_index] - got.times[got.hop_index - 1]
    return Run(
        context=len(prompt),
        mode=mode,
        ok=o.ok,
        reason=o.reason,
        step_s=step,
        gap_s=gap,
        downtime_s=o.downtime_s,
        total_s=total,
        bytes=o.bytes,
        exact=got.text == reference.text,
    )


def format_table(runs: list[Run]) -> str:
    def ms(x: float) -> str:
        return f"{x * 1e3:8.1f}"

    by = {(r.context, r.mode): r for r in runs}
    lines = [
        "context | step ms | staged: gap ms (steps) downtime ms (steps) total ms   MiB "
        "exact | recompute: gap ms (steps) total ms exact | gap recompute/staged",
        "-" * 142,
    ]
    for ctx in sorted({r.context for r in runs}):
        s, r = by.get((ctx, "staged")), by.get((ctx, "recompute"))
        if s is None or r is None:
            continue
        step = statistics.median([s.step_s, r.step_s])
        ratio = r.gap_s / s.gap_s if s.gap_s > 0 else float("nan")
        lines.append(
            f"{ctx:7d} | {ms(step)} | {ms(s.gap_s)} ({s.gap_s / step:4.1f})  "
            f"{ms(s.downtime_s)} ({s.downtime_s / step:4.1f}) {ms(s.total_s)} "
            f"{s.bytes / 2**20:5.1f} {'yes' if s.exact else 'NO':>5} "
            f"| {ms(r.gap_s)} ({r.gap_s / step:5.1f}) {ms(r.total_s)} "
            f"{'yes' if r.exact else 'NO':>5} | {ratio:8.1f}x"
            + ("" if s.ok and r.ok else f"  (aborted: {s.reason or r.reason})")
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__)
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--at-token", type=int, default=16, help="migrate after this many tokens")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    p.add_argument("--logs", default="/tmp/shoal-bench-migration", help="worker logs go here")
    return p.parse_args(argv)


def median_run(runs: list[Run]) -> Run:
    runs = sorted(runs, key=lambda r: r.gap_s)
    return runs[len(runs) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    model = bench_model(args.dtype)
    blocks = 2 * (-(-(max(contexts) + args.max_tokens) // 16)) + 64
    serve = ["--model", str(model), "--served-model-name", "bench", "--dtype", args.dtype,
             "--device", args.device, "--num-kv-blocks", str(blocks), "--max-num-seqs", "8",
             # Off: the recompute baseline must really recompute (no prefix left on B
             # by an earlier run), and the source must not skip the reference's prefill.
             "--no-prefix-caching", "--log-level", "warning"]  # fmt: skip
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    a, b = Worker(serve, logs / "worker-a.log"), Worker(serve, logs / "worker-b.log")
    rng = random.Random(0)
    all_runs: list[Run] = []
    cells: list[Run] = []
    try:
        a.wait_ready()
        b.wait_ready()
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        warm = [rng.randrange(100, vocab) for _ in range(64)]
        one_run(a, b, warm, "staged", 24, 8)  # compile kernels, warm both workers
        one_run(b, a, warm, "staged", 24, 8)
        for ctx in contexts:
            prompt = [rng.randrange(100, vocab) for _ in range(ctx)]
            for mode in MODES:
                runs = []
                for i in range(args.repeat):
                    run = one_run(a, b, prompt, mode, args.max_tokens, args.at_token)
                    log(
                        f"context {ctx} {mode} #{i + 1}: gap {run.gap_s * 1e3:.1f} ms, "
                        f"step {run.step_s * 1e3:.1f} ms, total {run.total_s * 1e3:.1f} ms, "
                        f"{'ok' if run.ok else 'aborted: ' + run.reason}, exact={run.exact}"
                    )
                    runs.append(run)
                all_runs += runs
                cells.append(median_run(runs))
    finally:
        a.stop()
        b.stop()
    print()
    print(f"Live migration, bench-llama {args.dtype} on {args.device}, same run:")
    print(format_table(cells))
    print(
        "\ngap: the client-seen time without tokens across the move (last token from the "
        "source to the first from the target); steps: gap / decode step; downtime: the "
        "source's stop-and-copy (paused -> handed off)."
    )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in all_runs], indent=1))
    # Staged must be exact; recompute need not be (bf16 prefill rounds differently
    # from the decode steps that filled the source's cache).
    staged = [r for r in all_runs if r.mode == "staged"]
    return 0 if all(r.ok for r in all_runs) and all(r.exact for r in staged) else 1


if __name__ == "__main__":
    raise SystemExit(main())
