"""Where LoRA meets the model: the stacked slot weights of each projection, the step's
token -> slot mapping, and the update ``y += (x @ A) @ B * scale`` inside ``Linear``.

Every projection an adapter may target (q/k/v/o/gate/up/down, including the columns of
the fused qkv and gate/up outputs) gets a ``LoRAStack``: A as [slots, max_rank, in]
(PEFT's ``lora_A.weight`` per slot) and B as [slots, max_rank, out] (PEFT's
``lora_B.weight`` transposed: the kernels walk output columns contiguously), on the
model's device. A ``Linear`` with stacks carries a
``LinearLoRA`` and, after its base matmul, adds the update to the column slice of each.

The step's ``LoRAMapping`` is built once per step by the model runner from the
scheduled sequences' slots. On CPU: host-side segments (contiguous token runs of one
slot; the scheduler orders sequences by slot, so there are few), each two matmuls; and
when many adapters are decoding, their single tokens as one gathered batch (BGMV in
torch: each token's A and B gathered, two batched matmuls for all of them), which costs
a few ops per projection instead of a few per adapter. On CUDA: a [T] index tensor
(-1: no adapter) for the Triton kernels. Base-only tokens cost nothing on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shoal.runtime.lora.adapter import SUPPORTED_MODULES, LoRAWeights, TargetShape

# Fused shard name -> the PEFT module it stands for.
SHARD_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}


@dataclass
class LoRAMapping:
    """Which slot each token of the current step uses."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot)
    indices: torch.Tensor | None = None  # [T] slots, -1 for base-only (CUDA path)
    # Decode tokens done as one gathered batch (CPU): their rows [start, end) and slots.
    gather: tuple[int, int] | None = None
    gather_slots: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.segments) or self.gather is not None

    def clear(self) -> None:
        self.segments = []
        self.indices = None
        self.gather = None
        self.gather_slots = None


# Decode runs of at least this many distinct adapters go through the gathered batch.
GATHER_MIN_RUNS = 4


def split_decodes(
    segments: list[tuple[int, int, int]], num_decode_tokens: int
) -> tuple[tuple[int, int] | None, list[int], list[tuple[int, int, int]]]:
    """Split the step's segments into the decode tokens done as one gathered batch
    ((start, end) and each token's slot) and the segments left to run one by one. Decode
    tokens (one per sequence) come first in a step; they are gathered when they span
    at least GATHER_MIN_RUNS segments and have no base-only token between them. Pure."""
    decode = [s for s in segments if s[1] <= num_decode_tokens]
    if len(decode) < GATHER_MIN_RUNS:
        return None, [], segments
    start, end = decode[0][0], decode[-1][1]
    if sum(e - s for s, e, _ in decode) != end - start:  # base-only rows in between
        return None, [], segments
    slots = [slot for s, e, slot in decode for _ in range(e - s)]
    return (start, end), slots, segments[len(decode) :]


def build_segments(slots_and_lengths: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Per-sequence (slot, number of tokens), in batch order -> runs of one slot >= 0. Pure."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for slot, n in slots_and_lengths:
        end = start + n
        if slot >= 0 and n > 0:
            if segments and segments[-1][2] == slot and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], end, slot)
            else:
                segments.append((start, end, slot))
        start = end
    return segments


class LoRAStack:
    """One projection's adapter weights for every resident slot."""

    def __init__(
        self,
        shape: TargetShape,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        mapping: LoRAMapping,
    ):
        self.shape = shape
        self.mapping = mapping
        self.a = torch.zeros(num_slots, max_rank, shape.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, max_rank, shape.out_features, dtype=dtype, device=device)
        self.ranks = [0] * num_slots  # 0: this slot's adapter does not touch this module
        self.num_targeting = 0  # resident adapters that do touch it (0: skip the module)
        self.scales = [0.0] * num_slots
        self.scales_tensor = torch.zeros(num_slots, dtype=torch.float32, device=device)

    def set_slot(self, slot: int, weights: LoRAWeights | None) -> None:
        """Copy one adapter's weights into ``slot`` (None: the adapter skips this module)."""
        self.num_targeting += (weights is not None) - (self.ranks[slot] > 0)
        if weights is None:
            self.ranks[slot] = 0
            self.scales[slot] = 0.0
            self.scales_tensor[slot] = 0.0  # the kernel then adds exactly zero
            return
        r = weights.rank
        self.a[slot, :r].copy_(weights.a)
        self.a[slot, r:].zero_()
        self.b[slot, :r].copy_(weights.b.t())
        self.b[slot, r:].zero_()
        self.ranks[slot] = r
        self.scales[slot] = weights.scale
        self.scales_tensor[slot] = weights.scale

    def apply(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """Add this step's LoRA updates to ``y`` (a column slice of the layer output)."""
        mapping = self.mapping
        if self.num_targeting == 0:  # e.g. MLP projections under attention-only adapters
            return
        if x.is_cuda and mapping.indices is not None:
            from shoal.runtime.kernels.lora import bgmv

            bgmv(
                y,
                x,
                self.a.transpose(1, 2),
                self.b,
                mapping.indices,
                self.scales_tensor,
            )
            return
        if mapping.gather is not None:
            self._apply_gathered(y, x, *mapping.gather, mapping.gather_slots)
        for start, end, slot in mapping.segments:
            r = self.ranks[slot]
            if r == 0:
                continue
            # The same two products PEFT computes (x A^T, then h B^T with B^T stored),
            # so float32 results match it to the last bits.
            # (on CPU the stacks are float32 whatever the model's dtype: .to() is a no-op
            # for float32 models and upcasts bf16/fp16 ones)
            h = F.linear(x[start:end].to(self.a.dtype), self.a[slot, :r])
            delta = (h @ self.b[slot, :r]) * self.scales[slot]
            y[start:end] += delta.to(y.dtype)

    def _apply_gathered(
        self, y: torch.Tensor, x: torch.Tensor, start: int, end: int, slots: torch.Tensor
    ) -> None:
        """One token per row, each with its own slot: the compiled CPU kernel reads each
        row's A and B in place; without it, gather every row's A and B and do two batched
        matrix-vector products (slots whose adapter skips this module hold a zero scale)."""
        from shoal.runtime.kernels.lora_cpu import bgmv_cpu

        if bgmv_cpu(y[start:end], x[start:end], self.a, self.b, slots, self.scales_tensor):
            return
        a = self.a.index_select(0, slots)  # [G, R, in]
        h = torch.bmm(a, x[start:end].to(a.dtype).unsqueeze(2))  # [G, R, 1]
        b = self.b.index_select(0, slots)  # [G, R, out]
        delta = torch.bmm(h.transpose(1, 2), b).squeeze(1)  # [G, out]
        scales = self.scales_tensor.index_select(0, slots).to(delta.dtype)
        y[start:end] += (delta * scales.unsqueeze(1)).to(y.dtype)


class LinearLoRA:
    """The stacks of one ``Linear``: (output columns, stack) for each targeted shard."""

    def __init__(self, parts: list[tuple[slice, LoRAStack]], mapping: LoRAMapping):
        self.parts = parts
        self.mapping = mapping

    def apply(self, y: torch.Tensor, x: torch.Tensor) -> None:
        if not self.mapping.active:
            return
        for cols, stack in self.parts:
            stack.apply(y[:, cols], x)


@dataclass
class Target:
    """A projection an adapter may target: the Linear holding it and its columns."""

    linear: nn.Module
    cols: slice
    shape: TargetShape


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """The model's LoRA-able projections by PEFT module path (``model.layers.0.mlp.
    gate_proj``): fused Linears contribute one target per shard. Pure over the model."""
    from shoal.runtime.layers.linear import Linear

    targets: dict[str, Target] = {}
    for path, module in model.named_modules():
        if not isinstance(module, Linear) or ".layers." not in f".{path}":
            continue
        parent, _, leaf = path.rpartition(".")
        out_features, in_features = module.weight.shape
        shards = getattr(module.weight, "shards", None)
        if shards:
            for shard, cols in shards.items():
                peft_name = SHARD_MODULES.get(shard)
                if peft_name is not None:
                    width = cols.stop - cols.start
                    targets[f"{parent}.{peft_name}"] = Target(
                        module, cols, TargetShape(in_features, width)
                    )
        elif leaf in SUPPORTED_MODULES:
            targets[path] = Target(
                module, slice(0, out_features), TargetShape(in_features, out_features)
            )
    return targets
