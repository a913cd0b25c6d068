"""This machine's limit for the model: measured peaks turned into a tokens/s bound.

Two measurements with torch (the engines' own math library): dense matmul FLOP/s per
dtype and memory read bandwidth. The model's cost comes from its config.json: FLOPs per
token (2 x weights touched, plus attention over the context) and bytes per step (all
weights once per batched step, plus every running sequence's KV cache). The bound for a
closed-loop workload is its output tokens divided by max(compute time, memory time): no
engine on this machine can beat it, and how close an engine gets says how much of the
machine it uses. The cost model is pure and tested; only `measure_*` touch the hardware.
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


@dataclass(frozen=True)
class Machine:
    flops: dict[str, float]  # dtype -> FLOP/s
    read_bandwidth: float  # bytes/s


@dataclass(frozen=True)
class Bound:
    tok_s: float
    compute_s: float
    memory_s: float

    @property
    def limited_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def workload_cost(
    shape: ModelShape, requests: Sequence[BenchRequest], concurrency: int, dtype_bytes: int
) -> tuple[float, float]:
    """(FLOPs, bytes read) to serve `requests` with `concurrency` sequences per decode step.

    Each prompt token and each output token but the last goes through the model once
    (the last output is sampled, never fed back); logits are computed once per output
    token. Each decode step reads all weights once and the running sequences' KV cache,
    and a full batch makes outputs/concurrency steps.
    """
    flops = 0.0
    kv_read = 0.0
    for r in requests:
        p, o = len(r.prompt), r.max_tokens
        # sum over positions of the attention context, in closed form
        flops += sum(shape.token_flops(c, with_logits=False) for c in (1, p)) / 2 * p
        flops += 2 * shape.head_params  # the first output token's logits
        decode_contexts = range(p + 1, p + o)  # contexts of the fed-back output tokens
        flops += sum(shape.token_flops(c, with_logits=True) for c in decode_contexts)
        kv_read += sum(decode_contexts) * shape.kv_bytes_per_token(dtype_bytes)
    steps = sum(r.max_tokens for r in requests) / concurrency
    weight_read = steps * shape.weight_params * dtype_bytes
    return flops, weight_read + kv_read


def throughput_bound(
    shape: ModelShape,
    machine: Machine,
    requests: Sequence[BenchRequest],
    concurrency: int,
    dtype: str,
) -> Bound:
    flops, nbytes = workload_cost(shape, requests, concurrency, DTYPE_BYTES[dtype])
    compute_s = flops / machine.flops[dtype]
    memory_s = nbytes / machine.read_bandwidth
    outputs = sum(r.max_tokens for r in requests)
    return Bound(outputs / max(compute_s, memory_s), compute_s, memory_s)


# --- measurements (hardware; not unit-tested) ------------------------------------------


def _best_time(fn, min_total_s: float = 0.3, repeats: int = 5) -> float:
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


def measure_machine(dtypes: Sequence[str]) -> Machine:
    return Machine({d: measure_matmul_flops(d) for d in dtypes}, measure_read_bandwidth())
