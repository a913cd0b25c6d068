"""The bench's math: percentiles, Poisson arrivals, summaries, the roofline cost model."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

# bench/ is run from the repository root (`python -m bench.serving`), not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.roofline import (
    Machine,
    MatmulTimes,
    ModelShape,
    fastest,
    throughput_bound,
    workload_cost,
)
from bench.stats import RequestRecord, percentile, poisson_arrivals, summarize
from bench.workload import BenchRequest, Workload, make_requests, static_batches


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [0.3, 7.0, 1.5, 2.25, 9.0, 4.0, 4.0, 0.1, 6.5]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edges():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_poisson_arrivals_have_exponential_gaps_at_the_rate():
    rate = 4.0
    times = poisson_arrivals(rate, 20_000, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0
    assert all(g >= 0 for g in gaps)
    # exponential: mean = stdev = 1/rate (tolerance far above the sampling error at n=20k)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    # memoryless: P(gap > 1/rate) = e^-1
    assert sum(g > 1 / rate for g in gaps) / len(gaps) == pytest.approx(np.exp(-1), abs=0.02)


def test_poisson_arrivals_are_seeded_and_validated():
    assert poisson_arrivals(2.0, 10, seed=3) == poisson_arrivals(2.0, 10, seed=3)
    assert poisson_arrivals(2.0, 10, seed=3) != poisson_arrivals(2.0, 10, seed=4)
    assert len(poisson_arrivals(2.0, 1, seed=0)) == 1
    with pytest.raises(ValueError, match="positive"):
        poisson_arrivals(0.0, 5, seed=0)


def test_summarize_throughput_ttft_tpot_and_failures():
    records = [
        # sent, first token, finished, prompt, output
        RequestRecord(0.0, 0.5, 2.5, 10, 5),  # TTFT 0.5, TPOT 2.0/4 = 0.5
        RequestRecord(1.0, 1.25, 4.0, 20, 12),  # TTFT 0.25, TPOT 2.75/11 = 0.25
        RequestRecord(2.0, 2.0, 2.0, 30, 0, error="HTTP 500"),
    ]
    s = summarize(records)
    assert (s.requests, s.failed) == (3, 1)
    assert s.duration_s == 4.0
    assert s.output_tokens == 17 and s.prompt_tokens == 30
    assert s.output_tok_s == pytest.approx(17 / 4.0)
    assert s.ttft_p50 == pytest.approx(0.375)
    assert s.tpot_p50 == pytest.approx(0.375)
    assert s.tpot_p99 == pytest.approx(0.25 + 0.25 * 0.99)


def test_summarize_refuses_all_failed():
    with pytest.raises(ValueError, match="no request succeeded"):
        summarize([RequestRecord(0, 0, 0, 1, 0, error="boom")])


def test_requests_are_seeded_within_ranges():
    w = Workload("w", 50, (3, 9), (2, 4))
    a = make_requests(w, [5, 6, 7], seed=1)
    assert a == make_requests(w, [5, 6, 7], seed=1)
    assert a != make_requests(w, [5, 6, 7], seed=2)
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.max_tokens <= 4 for r in a)
    assert {t for r in a for t in r.prompt} <= {5, 6, 7}
    assert [len(b) for b in static_batches(a, 32)] == [32, 18]
    # another variant: same lengths (same work), different tokens (no prefix-cache hits)
    b = make_requests(w, list(range(100, 1000)), seed=1, variant=1)
    c = make_requests(w, list(range(100, 1000)), seed=1, variant=0)
    assert [(len(r.prompt), r.max_tokens) for r in b] == [(len(r.prompt), r.max_tokens) for r in a]
    assert all(x.prompt != y.prompt for x, y in zip(b, c, strict=True))


LLAMA = ModelShape(
    hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=32000
)


def test_model_cost_matches_hand_count():
    # q,o: 512x512 each; k,v: 512x256 each; mlp: 3 x 512x1536 -> 3,145,728 per layer
    assert LLAMA.layer_params == 3_145_728
    assert LLAMA.weight_params == 8 * 3_145_728 + 512 * 32000
    # ~83 MFLOP per token without attention, as the issue counts it
    assert LLAMA.token_flops(0, with_logits=True) == pytest.approx(83.1e6, rel=0.01)
    # bf16 KV: K and V, 4 heads x 64 dims, 8 layers, 2 bytes
    assert LLAMA.kv_bytes_per_token(2) == 8192


def test_layer_gemms_cover_the_layer_weights():
    assert sum(k * n for k, n in LLAMA.layer_gemms()) == LLAMA.layer_params


def test_workload_cost_counts_prompt_and_decode_tokens():
    r = BenchRequest([1] * 4, 3)
    w = workload_cost(LLAMA, [r], concurrency=1, dtype_bytes=2)
    # prompt at contexts 1..4; outputs 1 and 2 fed back at contexts 5, 6; 3 logits rows
    assert (w.prompt_tokens, w.fed_back_tokens, w.logits_rows) == (4, 2, 3)
    body = 2 * LLAMA.layers * LLAMA.layer_params
    assert w.matmul_flops == 6 * body + 3 * 2 * LLAMA.head_params
    per_context = LLAMA.layers * 4 * LLAMA.heads * LLAMA.head_dim
    assert w.attention_flops == per_context * (1 + 2 + 3 + 4 + 5 + 6)
    # matches the per-token count summed by hand
    by_hand = sum(LLAMA.token_flops(c, with_logits=False) for c in range(1, 7))
    assert w.matmul_flops + w.attention_flops == by_hand + 3 * 2 * LLAMA.head_params
    # 3 decode steps reading all weights, KV read at contexts 5 and 6
    assert w.bytes_read == 3 * LLAMA.weight_params * 2 + (5 + 6) * 8192


def _machine(matmul_scale: float, bandwidth: float) -> Machine:
    """Matmul times proportional to the FLOPs, `matmul_scale` seconds per GFLOP."""
    layer = LLAMA.layer_params * 2 / 1e9 * matmul_scale
    times = MatmulTimes(
        prefill_m=1,
        layer_prefill_s=layer,
        decode_m=1,
        layer_decode_s=layer,
        head_decode_s=LLAMA.head_params * 2 / 1e9 * matmul_scale,
    )
    return Machine({"bfloat16": 1e9 / matmul_scale}, bandwidth, {"bfloat16": times})


def test_bound_takes_the_slower_of_compute_and_memory():
    reqs = [BenchRequest([1] * 128, 64)] * 32
    w = workload_cost(LLAMA, reqs, 32, 2)
    flops = w.matmul_flops + w.attention_flops
    scale = 2.0 / (flops / 1e9)  # peak = all FLOPs in 2 s
    b = throughput_bound(LLAMA, _machine(scale, w.bytes_read / 1.0), reqs, 32, "bfloat16")
    assert b.compute_s == pytest.approx(2.0)
    assert b.memory_s == pytest.approx(1.0)
    assert b.limited_by == "compute"
    assert b.tok_s == pytest.approx(32 * 64 / 2.0)
    assert b.torch_tok_s == pytest.approx(b.tok_s)  # torch matmuls ran at "peak" here
    memory_bound = _machine(scale, w.bytes_read / 3.0)
    b = throughput_bound(LLAMA, memory_bound, reqs, 32, "bfloat16")
    assert b.limited_by == "memory"
    assert b.tok_s == pytest.approx(32 * 64 / 3.0)


def test_slow_decode_matmuls_lower_only_the_torch_figure():
    reqs = [BenchRequest([1] * 128, 64)] * 32
    m = _machine(1.0, 1e15)
    slow = dataclasses.replace(
        m.matmuls["bfloat16"], layer_decode_s=3 * m.matmuls["bfloat16"].layer_decode_s
    )
    fast = throughput_bound(LLAMA, m, reqs, 32, "bfloat16")
    b = throughput_bound(
        LLAMA, dataclasses.replace(m, matmuls={"bfloat16": slow}), reqs, 32, "bfloat16"
    )
    assert b.tok_s == pytest.approx(fast.tok_s)
    assert b.torch_tok_s < b.tok_s


def test_fastest_keeps_the_better_of_each_measurement():
    a, b = _machine(1.0, 10.0), _machine(2.0, 20.0)  # b: slower matmuls, more bandwidth
    best = fastest(a, b)
    assert best.flops == a.flops and best.read_bandwidth == 20.0
    assert best.matmuls == a.matmuls


def test_profile_collapsed_stacks_to_self_and_inclusive_time():
    from bench.profile import parse_collapsed, top_functions

    raw = [
        "run (threading.py:1);step (engine.py:10);forward (linear.py:5) 6",
        "run (threading.py:1);step (engine.py:12);attn (attention.py:7) 3",
        "run (threading.py:1);recurse (r.py:1);recurse (r.py:2) 1",
        "",
    ]
    self_time, inclusive, total = top_functions(parse_collapsed(raw))
    assert total == 10
    assert self_time["forward (linear.py)"] == 6 and self_time["attn (attention.py)"] == 3
    # lines of one function merge; a recursive frame counts once per sample
    assert inclusive["step (engine.py)"] == 9 and inclusive["recurse (r.py)"] == 1
    assert inclusive["run (threading.py)"] == 10
