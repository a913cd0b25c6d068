"""This machine's limit for the model: measured speeds turned into a tokens/s bound.

Measured with torch (the engines' own math libraries): peak dense matmul FLOP/s per
dtype, memory read bandwidth, and the time of the model's own matmuls at the batch
shapes the workload implies (a 2048-token prefill chunk, a 32-sequence decode step).
The model's cost comes from its config.json: tokens through the layers, LM-head rows,
attention FLOPs over the context, and bytes per step (all weights once per decode step,
plus every running sequence's KV cache). The bound for a closed-loop workload is its
output tokens divided by max(compute time, memory time): no engine on this machine can
beat it (short of running the matmuls faster than torch does), and how close an engine
gets says how much of the machine it uses. The cost model is pure and tested; only
`measure_*` touch the hardware.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.workload import BenchRequest

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
        )

    @property
    def layer_params(self) -> int:
        """Weights every token multiplies through in one decoder layer (norms are noise)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return q_o + k_v + mlp

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def weight_params(self) -> int:
        """Parameters read per step (the embedding is gathered by row, not read whole)."""
        return self.layers * self.layer_params + self.head_params

    def token_flops(self, context: int, with_logits: bool) -> float:
        """FLOPs to push one token through the model at a given context length."""
        attention = 4 * self.heads * self.head_dim * context  # QK^T and PV
        flops = self.layers * (2 * self.layer_params + attention)
        return flops + (2 * self.head_params if with_logits else 0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def layer_gemms(self) -> list[tuple[int, int]]:
        """(K, N) of one decoder layer's matmuls: fused qkv, o, fused gate/up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]


@dataclass(frozen=True)
class MatmulTimes:
    """Measured seconds of the model's own matmuls on m tokens at once, for one dtype.

    Decode steps at 32 concurrent multiply 32-row activations, which no CPU runs at its
    peak FLOP/s; timing the real shapes makes the bound one an engine could approach.
    """

    prefill_m: int
    layer_prefill_s: float  # one decoder layer's GEMMs on prefill_m tokens
    decode_m: int
    layer_decode_s: float  # one decoder layer's GEMMs on decode_m tokens
    head_decode_s: float  # the LM head on decode_m tokens


@dataclass(frozen=True)
class Machine:
    flops: dict[str, float]  # dtype -> peak matmul FLOP/s
    read_bandwidth: float  # bytes/s
    matmuls: dict[str, MatmulTimes]  # dtype -> the model's matmuls at the workload's shapes


@dataclass(frozen=True)
class Work:
    """What serving a list of requests costs, independent of any machine."""

    prompt_tokens: int  # each goes through every layer once
    fed_back_tokens: int  # outputs fed back as decode inputs (all but each request's last)
    logits_rows: int  # LM-head rows: one per output token
    matmul_flops: float
    attention_flops: float
    bytes_read: float  # weights once per decode step, plus the KV cache each step reads


@dataclass(frozen=True)
class Bound:
    tok_s: float  # output tokens/s no engine can beat here: every FLOP at peak speed
    compute_s: float  # at peak matmul FLOP/s
    memory_s: float
    torch_tok_s: float  # what plain torch matmuls at the workload's shapes allow

    @property
    def limited_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def workload_cost(
    shape: ModelShape, requests: Sequence[BenchRequest], concurrency: int, dtype_bytes: int
) -> Work:
    """The work of serving `requests` with `concurrency` sequences per decode step.

    Each prompt token and each output token but the last goes through the model once
    (the last output is sampled, never fed back); logits are computed once per output
    token. Each decode step reads all weights once and the running sequences' KV cache,
    and a full batch makes outputs/concurrency steps.
    """
    prompt = fed_back = outputs = 0
    context_sum = decode_context_sum = 0  # attention work grows with the context
    for r in requests:
        p, o = len(r.prompt), r.max_tokens
        prompt += p
        fed_back += o - 1
        outputs += o
        context_sum += p * (p + 1) // 2  # prompt token at position c attends to c tokens
        decode_contexts = range(p + 1, p + o)
        decode_context_sum += sum(decode_contexts)
    body = 2 * shape.layers * shape.layer_params
    attention_per_context = shape.layers * 4 * shape.heads * shape.head_dim
    steps = outputs / concurrency
    return Work(
        prompt_tokens=prompt,
        fed_back_tokens=fed_back,
        logits_rows=outputs,
        matmul_flops=body * (prompt + fed_back) + 2 * shape.head_params * outputs,
        attention_flops=attention_per_context * (context_sum + decode_context_sum),
        bytes_read=steps * shape.weight_params * dtype_bytes
        + decode_context_sum * shape.kv_bytes_per_token(dtype_bytes),
    )


def throughput_bound(
    shape: ModelShape,
    machine: Machine,
    requests: Sequence[BenchRequest],
    concurrency: int,
    dtype: str,
) -> Bound:
    """Output tokens / max(compute time, memory time), two ways.

    The bound: every FLOP at the peak matmul speed, bytes at the measured bandwidth. No
    engine beats it (vLLM's prepacked oneDNN GEMMs do beat plain torch matmuls on small
    batches, so only the peak is a true ceiling).
    The torch figure: prompt tokens at the measured prefill matmul speed, fed-back tokens
    and logits at the measured 32-row decode speed, attention at peak: what an engine
    built on plain `torch.mm`/`F.linear` (as Shoal is) could reach at best.
    """
    work = workload_cost(shape, requests, concurrency, DTYPE_BYTES[dtype])
    t = machine.matmuls[dtype]
    peak = machine.flops[dtype]
    torch_s = (
        shape.layers * work.prompt_tokens * t.layer_prefill_s / t.prefill_m
        + shape.layers * work.fed_back_tokens * t.layer_decode_s / t.decode_m
        + work.logits_rows * t.head_decode_s / t.decode_m
        + work.attention_flops / peak
    )
    memory_s = work.bytes_read / machine.read_bandwidth
    peak_s = (work.matmul_flops + work.attention_flops) / peak
    outputs = sum(r.max_tokens for r in requests)
    return Bound(
        tok_s=outputs / max(peak_s, memory_s),
        compute_s=peak_s,
        memory_s=memory_s,
        torch_tok_s=outputs / max(torch_s, memory_s),
    )


# --- measurements (hardware; not unit-tested) ------------------------------------------


def _best_time(fn, min_total_s: float = 0.5, repeats: int = 10) -> float:
    """Best per-call time over `repeats` rounds, each long enough to average out timer noise."""
    fn()  # warm: first call allocates and picks kernels
    best = float("inf")
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_total_s / repeats:
                break
        best = min(best, elapsed / n)
    return best


def measure_matmul_flops(dtype: str, shapes: Sequence[tuple[int, int, int]] | None = None) -> float:
    """Best dense matmul FLOP/s over a few shapes (square, and the model's prefill GEMMs)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    best = 0.0
    for m, k, n in shapes or [(2048, 2048, 2048), (4096, 512, 1536), (1024, 1024, 1024)]:
        a = torch.randn(m, k).to(torch_dtype)
        b = torch.randn(k, n).to(torch_dtype)
        seconds = _best_time(lambda a=a, b=b: torch.mm(a, b))
        best = max(best, 2 * m * k * n / seconds)
    return best


def measure_read_bandwidth(nbytes: int = 512 << 20) -> float:
    """Bytes/s for streaming a buffer far larger than the caches through a reduction."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    seconds = _best_time(lambda: x.sum(), min_total_s=1.0)
    return nbytes / seconds


def measure_model_matmuls(
    shape: ModelShape, dtype: str, prefill_m: int = 2048, decode_m: int = 32
) -> MatmulTimes:
    """Time one decoder layer's GEMMs at prefill and decode batch sizes, and the LM head."""
    import torch

    torch_dtype = getattr(torch, dtype)

    def gemms(m: int, kns: Sequence[tuple[int, int]]):
        pairs = [
            (torch.randn(m, k).to(torch_dtype), torch.randn(k, n).to(torch_dtype)) for k, n in kns
        ]
        return lambda: [torch.mm(a, b) for a, b in pairs]

    layer = shape.layer_gemms()
    return MatmulTimes(
        prefill_m=prefill_m,
        layer_prefill_s=_best_time(gemms(prefill_m, layer)),
        decode_m=decode_m,
        layer_decode_s=_best_time(gemms(decode_m, layer)),
        head_decode_s=_best_time(gemms(decode_m, [(shape.hidden, shape.vocab)])),
    )


def measure_machine(dtypes: Sequence[str], shape: ModelShape, concurrency: int = 32) -> Machine:
    return Machine(
        flops={d: measure_matmul_flops(d) for d in dtypes},
        read_bandwidth=measure_read_bandwidth(),
        matmuls={d: measure_model_matmuls(shape, d, decode_m=concurrency) for d in dtypes},
    )


def fastest(a: Machine, b: Machine) -> Machine:
    """The better of two measurements, number by number: other work on the machine only
    ever slows a measurement down, so the fastest seen is the closest to the hardware."""
    return Machine(
        flops={d: max(a.flops[d], b.flops[d]) for d in a.flops},
        read_bandwidth=max(a.read_bandwidth, b.read_bandwidth),
        matmuls={
            d: MatmulTimes(
                prefill_m=a.matmuls[d].prefill_m,
                layer_prefill_s=min(a.matmuls[d].layer_prefill_s, b.matmuls[d].layer_prefill_s),
                decode_m=a.matmuls[d].decode_m,
                layer_decode_s=min(a.matmuls[d].layer_decode_s, b.matmuls[d].layer_decode_s),
                head_decode_s=min(a.matmuls[d].head_decode_s, b.matmuls[d].head_decode_s),
            )
            for d in a.matmuls
        },
    )
