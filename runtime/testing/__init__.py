"""Test and demo helpers: tiny random-weight checkpoints and PEFT LoRA adapters, and
running a model over the paged KV cache without the engine."""

from shoal.runtime.testing.adapters import make_tiny_adapter
from shoal.runtime.testing.factory import ARCHS, PRESETS, make_tiny_model
from shoal.runtime.testing.paged import (
    PagedRunner,
    allocate_kv_caches,
    build_metadata,
    decode_metadata,
    prefill_metadata,
)

__all__ = [
    "ARCHS",
    "PRESETS",
    "PagedRunner",
    "allocate_kv_caches",
    "build_metadata",
    "decode_metadata",
    "make_tiny_adapter",
    "make_tiny_model",
    "prefill_metadata",
]
