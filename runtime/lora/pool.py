"""The adapter pool: which adapters this worker serves, which are in host memory, which
sit in the resident slots the batch reads, and who is using them.

- *registered*: every adapter loaded through ``--lora`` or the admin API (name -> path).
- *host cache*: up to ``max_cpu_loras`` checked adapters in host memory, least recently
  used dropped first (a dropped one is read from disk again when next asked for).
- *resident*: ``max_loras`` slots of stacked weights on the model's device
  (``layers.LoRAStack``). A sequence admitted to the running batch pins its adapter's
  slot; idle slots are reused least recently used first.

A request for an adapter that is not resident waits: ``acquire`` says "not yet", the
scheduler runs the others, and either the host copy is moved into a free slot at the
next step or its weights are first read from disk by a background thread.

Threads: the engine's step thread calls ``acquire``/``release``/``ref``/``unref`` and
owns the slot tensors; HTTP handlers call ``load``/``unload``/``list``; the disk reader
fills the host cache. One lock guards the bookkeeping; slot tensors are written by the
step thread only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shoal.runtime.kernels import lora_cpu
from shoal.runtime.lora.adapter import INVALID, LoRAAdapter, LoRALoadError, read_adapter
from shoal.runtime.lora.layers import LinearLoRA, LoRAMapping, LoRAStack, lora_targets

log = logging.getLogger(__name__)

SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class AdapterEntry:
    name: str
    path: str
    uid: int  # distinct per load: a name loaded again is another adapter (prefix cache)
    rank: int
    slot: int = -1
    pins: int = 0  # running sequences using the slot
    refs: int = 0  # sequences in the engine (waiting or running) using the adapter
    retired: bool = False  # unloaded; dropped once no sequence uses it
    last_used: float = field(default_factory=time.monotonic)
    reading: bool = False  # a background disk read is under way
    read_error: str | None = None  # the files went bad after the load: cannot swap in


@dataclass
class AdapterCounters:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class SwapHistogram:
    """Cumulative-bucket histogram of swap-in seconds (read at scrape time)."""

    buckets: tuple[float, ...] = SWAP_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(SWAP_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, upper in enumerate(self.buckets):
            if seconds <= upper:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for upper, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            running += count
            out.append((upper, running))
        return out


def choose_slot(slots: list[AdapterEntry | None]) -> int | None:
    """A free slot, else the least recently used slot whose adapter no running sequence
    uses; None when every slot is pinned. Pure."""
    for i, entry in enumerate(slots):
        if entry is None:
            return i
    idle = [(e.last_used, i) for i, e in enumerate(slots) if e is not None and e.pins == 0]
    return min(idle)[1] if idle else None


class LoRAPool:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_loras: int = 8,
        max_lora_rank: int = 16,
        max_cpu_loras: int = 32,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.device = device
        # CPUs compute the updates in float32 (see kernels/lora_cpu.cpp); GPUs in the
        # model's dtype (the Triton kernels accumulate in fp32 anyway).
        self.stack_dtype = dtype if device.type == "cuda" else torch.float32
        self.targets = lora_targets(model)
        self.shapes = {path: t.shape for path, t in self.targets.items()}
        self.mapping = LoRAMapping()
        self.stacks: dict[str, LoRAStack] = {}  # allocated at the first swap-in
        self.slots: list[AdapterEntry | None] = [None] * max_loras
        self.names: dict[str, AdapterEntry] = {}  # registered, by name
        self.by_uid: dict[int, AdapterEntry] = {}  # registered and retiring
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU: oldest first
        self.counters: dict[str, AdapterCounters] = {}
        self.loads_total = 0
        self.evictions_total = 0
        self.swap_seconds = SwapHistogram()
        self._uids = itertools.count(1)
        self._lock = threading.RLock()
        self.ready = threading.Event()  # set when a background read finished
        self._failed: list[int] = []

    # ---- admin (any thread) -------------------------------------------------------------
    def load(self, name: str, path: str) -> bool:
        """Register adapter ``name`` from ``path``; False if it already was (same path).
        Raises LoRALoadError with a code for anything unservable."""
        with self._lock:
            existing = self.names.get(name)
            if existing is not None:
                if existing.path == path:
                    return False
                raise LoRALoadError(
                    INVALID,
                    f"adapter {name!r} is already loaded from {existing.path!r}; unload it "
                    "before loading another path under that name",
                )
        adapter = read_adapter(name, path, self.shapes, self.max_rank)
        with self._lock:
            if name in self.names:  # a concurrent load of the same name won
                return self.load(name, path)
            entry = AdapterEntry(name=name, path=path, uid=next(self._uids), rank=adapter.rank)
            self.names[name] = entry
            self.by_uid[entry.uid] = entry
            self.counters.setdefault(name, AdapterCounters())
            self._cache(entry.uid, adapter)
        log.info(
            "loaded adapter %s from %s (rank %d, %d modules, %.1f MiB)",
            name,
            path,
            adapter.rank,
            len(adapter.modules),
            adapter.nbytes / 2**20,
        )
        return True

    def unload(self, name: str) -> bool:
        """Stop serving ``name``; sequences already using it finish first. False if unknown."""
        with self._lock:
            entry = self.names.pop(name, None)
            if entry is None:
                return False
            entry.retired = True
            if entry.refs == 0:
                self._drop(entry)
        log.info("unloaded adapter %s", name)
        return True

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self.names

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": e.name,
                    "path": e.path,
                    "rank": e.rank,
                    "resident": e.slot >= 0,
                    "running": e.pins,
                }
                for e in self.names.values()
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "resident": sum(e is not None for e in self.slots),
                "cpu_cached": len(self.host),
                "loads_total": self.loads_total,
                "evictions_total": self.evictions_total,
                "swap_seconds": self.swap_seconds.cumulative(),
                "swap_seconds_sum": self.swap_seconds.total,
                "running": {e.name: e.pins for e in self.names.values()},
                "counters": {k: AdapterCounters(**vars(v)) for k, v in self.counters.items()},
            }

    # ---- the engine (step thread) -----------------------------------------------------
    def ref(self, name: str) -> int:
        """A sequence for adapter ``name`` enters the engine: returns the adapter's uid.
        Raises KeyError if it is not registered."""
        with self._lock:
            entry = self.names[name]
            entry.refs += 1
            return entry.uid

    def unref(self, uid: int) -> None:
        with self._lock:
            entry = self.by_uid.get(uid)
            if entry is None:
                return
            entry.refs -= 1
            if entry.retired and entry.refs <= 0:
                self._drop(entry)

    def acquire(self, uid: int) -> int | None:
        """The slot of adapter ``uid`` for a sequence about to run (pinned until
        ``release``), or None if it is not resident yet (a swap-in is then under way)."""
        with self._lock:
            entry = self.by_uid[uid]
            if entry.slot < 0 and not self._swap_in(entry):
                return None
            entry.pins += 1
            entry.last_used = time.monotonic()
            return entry.slot

    def release(self, uid: int) -> None:
        with self._lock:
            entry = self.by_uid.get(uid)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                entry.last_used = time.monotonic()

    def count(self, name: str, *, requests: int = 0, prompt: int = 0, generated: int = 0):
        with self._lock:
            c = self.counters.setdefault(name, AdapterCounters())
            c.requests += requests
            c.prompt_tokens += prompt
            c.generation_tokens += generated

    def set_step(self, slots_and_lengths: list[tuple[int, int]]) -> None:
        """The step's sequences as (slot or -1, tokens), in batch order (decodes first)."""
        from shoal.runtime.lora.layers import build_segments, split_decodes

        mapping = self.mapping
        mapping.clear()
        segments = build_segments(slots_and_lengths)
        if not segments:
            return
        if self.device.type == "cuda":
            mapping.segments = segments
            per_token = [slot for slot, n in slots_and_lengths for _ in range(n)]
            mapping.indices = torch.tensor(per_token, dtype=torch.int32, device=self.device)
            return
        if self.dtype != torch.float32 and lora_cpu.load() is not None:
            # bf16/fp16: torch's small matmuls in these types are slow on CPUs without
            # native support; the kernel computes every token in fp32 in one call.
            per_token = [slot for slot, n in slots_and_lengths for _ in range(n)]
            mapping.gather = (0, len(per_token))
            mapping.gather_slots = torch.tensor(per_token, dtype=torch.long)
            return
        # float32: prefill chunks as segments (the same matmuls as PEFT), many decoding
        # adapters as one gathered batch
        num_decode_tokens = 0
        for _, n in slots_and_lengths:
            if n != 1:
                break
            num_decode_tokens += 1
        gather, slots, rest = split_decodes(segments, num_decode_tokens)
        mapping.segments = rest
        if gather is not None:
            mapping.gather = gather
            mapping.gather_slots = torch.tensor(slots, dtype=torch.long)

    def clear_step(self) -> None:
        self.mapping.clear()

    # ---- internals (lock held) ---------------------------------------------------------
    def _cache(self, uid: int, adapter: LoRAAdapter) -> None:
        self.host[uid] = adapter
        self.host.move_to_end(uid)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _drop(self, entry: AdapterEntry) -> None:
        self.by_uid.pop(entry.uid, None)
        self.host.pop(entry.uid, None)
        if entry.slot >= 0:
            self.slots[entry.slot] = None
            entry.slot = -1

    def _swap_in(self, entry: AdapterEntry) -> bool:
        adapter = self.host.get(entry.uid)
        if adapter is None and entry.read_error is not None:
            return False  # its requests are failed by the engine (take_failed)
        if adapter is None:
            self._read_in_background(entry)
            return False
        slot = choose_slot(self.slots)
        if slot is None:
            return False
        started = time.monotonic()
        self._ensure_stacks()
        victim = self.slots[slot]
        if victim is not None:
            victim.slot = -1
            self.evictions_total += 1
        for path, stack in self.stacks.items():
            stack.set_slot(slot, adapter.modules.get(path))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.slots[slot] = entry
        entry.slot = slot
        self.host.move_to_end(entry.uid)
        self.loads_total += 1
        self.swap_seconds.observe(time.monotonic() - started)
        log.debug("adapter %s -> slot %d (evicted %s)", entry.name, slot, victim and victim.name)
        return True

    def _ensure_stacks(self) -> None:
        if self.stacks:
            return
        parts: dict[int, list] = {}
        for path, target in self.targets.items():
            stack = LoRAStack(
                target.shape,
                self.max_loras,
                self.max_rank,
                self.stack_dtype,
                self.device,
                self.mapping,
            )
            self.stacks[path] = stack
            parts.setdefault(id(target.linear), [target.linear, []])[1].append((target.cols, stack))
        for linear, linear_parts in parts.values():
            linear.lora = LinearLoRA(linear_parts, self.mapping)
        size = sum(s.a.nbytes + s.b.nbytes for s in self.stacks.values())
        log.info(
            "LoRA slots: %d adapters of rank <= %d over %d projections (%.1f MiB on %s)",
            self.max_loras,
            self.max_rank,
            len(self.stacks),
            size / 2**20,
            self.device,
        )

    def _read_in_background(self, entry: AdapterEntry) -> None:
        if entry.reading:
            return
        entry.reading = True
        threading.Thread(
            target=self._read, args=(entry,), name=f"lora-read-{entry.name}", daemon=True
        ).start()

    def _read(self, entry: AdapterEntry) -> None:
        try:
            adapter = read_adapter(entry.name, entry.path, self.shapes, self.max_rank)
        except LoRALoadError as exc:
            # The files changed since the adapter was loaded; its requests keep waiting
            # until it is unloaded (which the admin API and the operator can see).
            log.error("re-reading adapter %s from %s failed: %s", entry.name, entry.path, exc)
            adapter = None
        with self._lock:
            entry.reading = False
            if adapter is None:
                entry.read_error = f"adapter {entry.name!r} can no longer be read from {entry.path}"
                self._failed.append(entry.uid)
            elif entry.uid in self.by_uid:
                self._cache(entry.uid, adapter)
        self.ready.set()

    def take_failed(self) -> list[tuple[int, str]]:
        """(uid, reason) of adapters whose re-read from disk failed since the last call:
        the engine fails their waiting requests instead of letting them wait forever."""
        with self._lock:
            failed, self._failed = self._failed, []
            return [
                (uid, self.by_uid[uid].read_error or "") for uid in failed if uid in self.by_uid
            ]
