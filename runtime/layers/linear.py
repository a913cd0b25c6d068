"""Linear layers whose weights come from a checkpoint, possibly several tensors fused.

Parameters are allocated uninitialised (the loader fills every element or fails), and a
fused parameter records where each checkpoint tensor goes: ``param.shards`` maps a shard
name ("q", "k", "v", "gate", "up") to its rows. The loader reads that map; nothing else
needs to know which checkpoint tensors were fused.

A ``Linear`` that LoRA adapters may target gets ``lora`` (a ``LinearLoRA``) when the
adapter pool is set up; it then adds the step's adapter updates to its output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def empty_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def set_shards(param: nn.Parameter, sizes: dict[str, int]) -> None:
    """Record that ``param``'s rows (dim 0, per expert for stacked experts) are ``sizes``."""
    shards, start = {}, 0
    for name, size in sizes.items():
        shards[name] = slice(start, start + size)
        start += size
    param.shards = shards  # type: ignore[attr-defined]


class Linear(nn.Module):
    """y = x W^T (+ b); W is [out, in] as in checkpoints. ``shards`` fuses several outputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int | dict[str, int],
        bias: bool = False,
    ) -> None:
        super().__init__()
        sizes = out_features if isinstance(out_features, dict) else None
        out = sum(sizes.values()) if sizes else int(out_features)  # type: ignore[arg-type]
        self.weight = empty_param(out, in_features)
        self.bias = empty_param(out) if bias else None
        if sizes:
            set_shards(self.weight, sizes)
            if self.bias is not None:
                set_shards(self.bias, sizes)
        self.lora: Any = None  # a shoal.runtime.lora.layers.LinearLoRA, once adapters exist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora.apply(y, x)
        return y
