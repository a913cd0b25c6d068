"""The gated (SwiGLU) feed-forward block of Llama-family models, gate and up fused."""

from __future__ import annotations

import torch
from torch import nn

from shoal.runtime.layers.activation import silu_and_mul
from shoal.runtime.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        sizes = {"gate": intermediate_size, "up": intermediate_size}
        self.gate_up_proj = Linear(hidden_size, sizes, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
