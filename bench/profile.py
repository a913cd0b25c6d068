"""`python -m bench.profile`: where Shoal's server spends its time under a bench workload.

Starts `shoal serve` on the bench model, warms it, attaches py-spy (sampling, from the
outside: the server runs unmodified), drives one workload through the bench's client,
and prints the functions with the most samples, by self time and inclusive time (the
leaf-most frames in shoal/torch code). The raw collapsed stacks and a flame graph SVG
are kept in --out. Needs `py-spy` (pip) on PATH or in the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from bench import loadgen, servers
from bench.serving import bench_model, cache_dir, log, prompt_token_pool
from bench.workload import default_workloads, make_requests, warmup_prompt


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy's raw format: `frame;frame;...;leaf COUNT` per line, root first."""
    stacks = []
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: lines differ, functions don't."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(file).name})" if file else name


def top_functions(stacks, n: int = 20) -> tuple[Counter, Counter, int]:
    """(self samples, inclusive samples, total) per function over all stacks."""
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for frames, count in stacks:
        total += count
        names = [short(f) for f in frames]
        self_time[names[-1]] += count
        for name in set(names):  # recursion counts once per sample
            inclusive[name] += count
    return self_time, inclusive, total


def format_top(stacks, n: int = 20) -> str:
    self_time, inclusive, total = top_functions(stacks)
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time (where the CPU was):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_time.most_common(n)]
    lines += ["", "inclusive time (the call and everything under it):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(2 * n)]
    return "\n".join(lines)


def find_py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    return exe


def main(argv=None) -> int:
    names = [w.name for w in default_workloads()]
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--workload", default="headline", choices=names)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--shoal-args", default="", help="extra `shoal serve` flags, one string")
    p.add_argument("--out", type=Path, help="default: under the cache")
    args = p.parse_args(argv)
    py_spy = find_py_spy()
    out = args.out or cache_dir() / "bench" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    model_dir = bench_model(args.dtype)
    workload = next(w for w in default_workloads(args.quick) if w.name == args.workload)
    requests = make_requests(workload, prompt_token_pool(model_dir))
    port = servers.free_port()
    cmd = servers.shoal_command(
        sys.executable, model_dir, args.dtype, port, args.shoal_args.split()
    )
    with servers.running_server("shoal", cmd, out / "shoal.log") as server:
        warm = warmup_prompt(prompt_token_pool(model_dir))
        err = asyncio.run(loadgen.warm_up(server.base_url, servers.SERVED_NAME, warm))
        if err:
            raise SystemExit(f"warm-up failed: {err}")
        raw = out / "shoal.collapsed.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.process.pid), "--rate", str(args.rate),
             "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(1.0)  # let py-spy attach before the load starts
        log(f"profiling shoal under {workload.name}: {workload.describe()}")
        records = asyncio.run(
            loadgen.run_workload(server.base_url, servers.SERVED_NAME, workload, requests)
        )
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(60)
    tokens = sum(r.output_tokens for r in records)
    span = max(r.finished for r in records) - min(r.sent for r in records)
    log(f"{tokens} output tokens in {span:.1f} s ({tokens / span:.1f} tok/s) while profiled")
    if not raw.exists():
        raise SystemExit(f"py-spy wrote nothing (ptrace not permitted?); see {out}")
    report = format_top(parse_collapsed(raw.read_text().splitlines()))
    (out / "top.txt").write_text(report + "\n")
    print(report)
    log(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
