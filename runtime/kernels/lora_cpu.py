"""The CPU BGMV kernel (``lora_cpu.cpp``), compiled on first use like the CPU attention
kernel and cached beside it; None when it cannot be built (the torch path is then used).

Layouts: A [slots, R, in] and B [slots, R, out] contiguous float32 (the pool's), x
[T, in] and y [T, out] with unit column stride (y may be a column slice), slots int64
[T] (-1: no adapter), scales float32 [slots].
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from shoal.runtime.layers.cpu_kernels import cache_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "lora_cpu.cpp"


@functools.cache
def load():
    if os.environ.get("SHOAL_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils import cpp_extension

        # its own folder: two extensions sharing one would overwrite each other's
        # build.ninja and rebuild each other
        build = cache_dir() / "lora"
        build.mkdir(parents=True, exist_ok=True)
        log.info("loading Shoal's CPU LoRA kernel (compiled once into %s)", build)
        return cpp_extension.load(
            name="shoal_lora_cpu",
            sources=[str(_SOURCE)],
            # fast math lets the compiler vectorize the fp32 sums (reassociation)
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: slower but correct
        log.warning("CPU LoRA kernel unavailable (%s); using the torch path", exc)
        return None


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
