"""CPU kernels compiled on first use (torch C++ extension), with the torch path as the
fallback wherever no compiler is available.

Why: torch has no paged attention for CPUs. Its SDPA needs the context gathered into
a padded copy and is slow for one-token queries with a mask; on the bench model that
was ~80 % of a decode step. The kernel reads the cache blocks in place instead.
Builds are cached under $SHOAL_CACHE/torch-extensions (keyed by torch's version and
the source), so only the first worker on a machine pays the ~1 minute compile.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"


def cache_dir() -> Path:
    """Keyed by torch version and CPU flags: the build targets this machine's CPU."""
    root = Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal"))
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = ""
    cpu = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return root / "torch-extensions" / f"{torch.__version__.replace('+', '_')}-{cpu}"


def build_extension(name: str, source: Path, build: Path, what: str):
    """Compile (once; cached in `build`) and load a C++ extension; None when it cannot be
    built, and the caller uses its torch path. Each extension needs its own `build`
    folder: two sharing one overwrite each other's build.ninja and rebuild each other."""
    if os.environ.get("SHOAL_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils import cpp_extension

        build.mkdir(parents=True, exist_ok=True)
        log.info("loading Shoal's %s (compiled once into %s)", what, build)
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            # Fast math lets the compiler vectorize the sums (reassociation) and use vector
            # exp; the kernels have no infinities or NaNs to protect (the softmax max is
            # finite, the LoRA sums are plain products).
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: slower but correct
        log.warning("%s unavailable (%s); using the torch path", what, exc)
        return None


@functools.cache
def load():
    """The compiled module, or None (then callers use the torch path)."""
    return build_extension(
        "shoal_paged_attention_cpu", _SOURCE, cache_dir(), "CPU attention kernel"
    )


def paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, scale):
    module = load()
    if module is None:
        return None
    return module.paged_decode_attention(
        query.contiguous(), k_cache, v_cache, block_tables, seq_lens, float(scale)
    )
