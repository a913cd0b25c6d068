"""The CPU BGMV kernel (``lora_cpu.cpp``), compiled on first use like the CPU attention
kernel and cached beside it; None when it cannot be built (the torch path is then used).

Layouts: A [slots, R, in] and B [slots, R, out] contiguous float32 (the pool's), x
[T, in] and y [T, out] with unit column stride (y may be a column slice), slots int64
[T] (-1: no adapter), scales float32 [slots].
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from shoal.runtime.layers.cpu_kernels import build_extension, cache_dir

_SOURCE = Path(__file__).parent / "lora_cpu.cpp"


@functools.cache
def load():
    return build_extension("shoal_lora_cpu", _SOURCE, cache_dir() / "lora", "CPU LoRA kernel")


def bgmv_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
) -> bool:
    """Add the updates to ``y`` in place; False if the kernel is unavailable."""
    module = load()
    if module is None:
        return False
    module.bgmv(y, x if x.stride(1) == 1 else x.contiguous(), lora_a, lora_b, slots, scales)
    return True
