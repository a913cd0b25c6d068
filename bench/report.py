"""The bench's table and ratios, as text. Pure: results in, lines out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.roofline import Bound
from bench.stats import Summary

ENGINE_LABELS = {"shoal": "Shoal", "vllm": "vLLM-CPU", "hf": "transformers static"}


@dataclass
class Result:
    dtype: str
    workload: str  # Workload.name
    description: str  # Workload.describe()
    engine: str  # shoal | vllm | hf
    summary: Summary | None = None
    skipped: str | None = None  # why there is no summary
    bound: Bound | None = None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def engine_row(r: Result) -> str:
    label = f"{ENGINE_LABELS.get(r.engine, r.engine):<20}"
    if r.summary is None:
        return f"{label}  -- {r.skipped}"
    s = r.summary
    share = f"{100 * s.output_tok_s / r.bound.tok_s:6.1f}%" if r.bound else "     -"
    failed = f"  ({s.failed} failed)" if s.failed else ""
    return (
        f"{label}{s.output_tok_s:10.1f}{_ms(s.ttft_p50)}{_ms(s.ttft_p99)}"
        f"{_ms(s.tpot_p50)}{_ms(s.tpot_p99)}  {share}{failed}"
    )


HEADER = (
    f"{'engine':<20}{'out tok/s':>10}{'TTFT p50':>9}{'TTFT p99':>9}"
    f"{'TPOT p50':>9}{'TPOT p99':>9}  of bound   (latencies in ms)"
)


def ratio_line(ours: Result, theirs: Result) -> str | None:
    if ours.summary is None or theirs.summary is None:
        return None
    a, b = ours.summary, theirs.summary
    name = ENGINE_LABELS[theirs.engine]
    return (
        f"Shoal/{name}: throughput {a.output_tok_s / b.output_tok_s:.2f}x, "
        f"TTFT p99 {a.ttft_p99 / b.ttft_p99:.2f}x, TPOT p50 {a.tpot_p50 / b.tpot_p50:.2f}x"
    )


def format_group(results: Sequence[Result]) -> list[str]:
    """One workload at one dtype: header, a row per engine, the ratios."""
    first = results[0]
    title = f"== {first.workload} [{first.dtype}]: {first.description}"
    bound = next((r.bound for r in results if r.bound), None)
    if bound:
        title += (
            f"\n   machine bound {bound.tok_s:.0f} out tok/s ({bound.limited_by}-bound at peak "
            f"matmul FLOP/s); plain torch matmuls at these shapes allow {bound.torch_tok_s:.0f}"
        )
    lines = [title, HEADER, *(engine_row(r) for r in results)]
    by_engine = {r.engine: r for r in results}
    if "shoal" in by_engine:
        for other in ("vllm", "hf"):
            if other in by_engine and (line := ratio_line(by_engine["shoal"], by_engine[other])):
                lines.append(line)
    return lines


def format_report(results: Sequence[Result]) -> str:
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dtype, r.workload), []).append(r)
    order = {"shoal": 0, "vllm": 1, "hf": 2}
    blocks = [
        "\n".join(format_group(sorted(g, key=lambda r: order.get(r.engine, 9))))
        for g in groups.values()
    ]
    footer = "ratios: throughput above 1x is Shoal ahead; latencies below 1x is Shoal ahead"
    return "\n\n".join([*blocks, footer])
