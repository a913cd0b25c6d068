"""What a migration does to an engine, run on its step thread between two steps (via
AsyncLLMEngine.call_in_step): read a request's KV blocks, pause it, hand it off or
resume it on the source; reserve blocks, write them and install the request on the
target. Tensors cross threads as CPU tensors; bytes are made elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.runtime.engine.llm_engine import LLMEngine
from shoal.runtime.engine.sequence import Sequence, SequenceStatus
from shoal.runtime.migration import state as state_codec
from shoal.runtime.migration.migration_pb2 import KVLayout


class MigrationAbort(Exception):
    """A stage cannot go on; `reason` is the label on shoal_migrations_total."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def layout(engine: LLMEngine) -> KVLayout:
    info = engine.runner.info
    return KVLayout(
        model=engine.config.model_name,
        num_layers=info.num_layers,
        block_size=engine.config.block_size,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        dtype=str(info.dtype).removeprefix("torch."),
    )


def blocks_to_bytes(blocks: torch.Tensor | None) -> bytes:
    if blocks is None or blocks.numel() == 0:
        return b""
    return blocks.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_blocks(data: bytes, lay: KVLayout, num_blocks: int) -> torch.Tensor:
    dtype = getattr(torch, lay.dtype)
    shape = (lay.num_layers, 2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    return flat.reshape(shape)


def _gather(engine: LLMEngine, block_ids: list[int]) -> torch.Tensor | None:
    if not block_ids:
        return None
    idx = torch.tensor(block_ids, dtype=torch.long, device=engine.runner.device)
    parts = [
        torch.stack([k.index_select(0, idx), v.index_select(0, idx)])
        for k, v in engine.runner.kv_caches
    ]
    return torch.stack(parts).to("cpu")


def _scatter(engine: LLMEngine, block_ids: list[int], blocks: torch.Tensor) -> None:
    idx = torch.tensor(block_ids, dtype=torch.long, device=engine.runner.device)
    for layer, (k, v) in enumerate(engine.runner.kv_caches):
        k.index_copy_(0, idx, blocks[layer, 0].to(k.device))
        v.index_copy_(0, idx, blocks[layer, 1].to(v.device))


def _the_sequence(engine: LLMEngine, request_id: str) -> Sequence | None:
    seqs = engine.requests.get(request_id)
    if not seqs:
        return None
    if len(seqs) != 1:
        raise MigrationAbort("unsupported", "requests with n > 1 are not migrated")
    return seqs[0]


# ---- source side ----------------------------------------------------------------------


@dataclass
class Snapshot:
    num_tokens: int
    num_computed_tokens: int
    running: bool  # holds K/V (prefilling or decoding)
    adapter: str  # params.lora_name, "" for the base model


def describe(engine: LLMEngine, request_id: str) -> Snapshot | None:
    seq = _the_sequence(engine, request_id)
    if seq is None or seq.is_finished:
        return None
    return Snapshot(
        seq.num_tokens,
        seq.num_computed_tokens,
        seq.status is SequenceStatus.RUNNING,
        getattr(seq.params, "lora_name", None) or "",
    )


def has_adapter(engine: LLMEngine, name: str) -> bool:
    return not name or (getattr(engine, "lora", None) is not None and engine.lora.has(name))


def read_full_blocks(
    engine: LLMEngine, request_id: str, sent: list[int]
) -> tuple[list[int], torch.Tensor | None]:
    """The request's blocks filled since `sent` (block ids already copied), while it
    keeps running. Full blocks never change again, so their copy stays good."""
    seq = _the_sequence(engine, request_id)
    if seq is None or seq.is_finished:
        raise MigrationAbort("finished", "the request finished during the copy")
    if seq.status is not SequenceStatus.RUNNING or seq.block_table[: len(sent)] != sent:
        raise MigrationAbort("preempted", "the request lost its blocks during the copy")
    end = seq.num_computed_tokens // engine.block_manager.block_size
    new = seq.block_table[len(sent) : end]
    return new, _gather(engine, new)


@dataclass
class Paused:
    state: bytes
    generator: bytes
    block_ids: list[int]  # every block the target must hold (sent + tail)
    tail: torch.Tensor | None  # the blocks not sent yet, the partial last one included


def pause(engine: LLMEngine, request_id: str, sent: list[int], with_kv: bool) -> Paused:
    """Stop scheduling the request and take what is left: the stop-and-copy stage.
    Without K/V (a waiting request, or the recompute baseline) the target recomputes."""
    seq = _the_sequence(engine, request_id)
    if seq is None or seq.is_finished:
        raise MigrationAbort("finished", "the request finished before the last stage")
    if seq.status is SequenceStatus.RUNNING:
        if with_kv and seq.block_table[: len(sent)] != sent:
            raise MigrationAbort("preempted", "the request lost its blocks during the copy")
        engine.scheduler.running.remove(seq)
    elif seq.status is SequenceStatus.WAITING:
        engine.scheduler.waiting.remove(seq)
        with_kv = False
    else:
        raise MigrationAbort("busy", f"the request is {seq.status.value}")
    seq.status = SequenceStatus.PAUSED
    computed = seq.num_computed_tokens if with_kv else 0
    state, generator = state_codec.encode(seq, num_computed_tokens=computed)
    block_ids = list(seq.block_table) if with_kv else []
    tail = _gather(engine, block_ids[len(sent) :]) if with_kv else None
    return Paused(state, generator, block_ids, tail)


def resume(engine: LLMEngine, request_id: str) -> bool:
    """Undo pause(): the migration aborted, the request goes on here."""
    seqs = engine.requests.get(request_id)
    if not seqs or seqs[0].status is not SequenceStatus.PAUSED:
        return False
    seq = seqs[0]
    if seq.block_table:
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.running.append(seq)
    else:
        seq.status = SequenceStatus.WAITING
        engine.scheduler.waiting.appendleft(seq)
    return True


def hand_off(engine: LLMEngine, request_id: str) -> bool:
    """The target holds the request now: free it here. False if it was aborted meanwhile."""
    seqs = engine.requests.get(request_id)
    if not seqs or seqs[0].status is not SequenceStatus.PAUSED:
        return False
    del engine.requests[request_id]
    engine.scheduler.finish(seqs[0], "migrated")  # frees blocks and the adapter slot
    return True


# ---- target side ----------------------------------------------------------------------


def reserve(engine: LLMEngine, num_blocks: int) -> list[int] | None:
    return engine.block_manager.take_blocks(num_blocks)


def grow(engine: LLMEngine, block_ids: list[int], num_blocks: int) -> bool:
    """Extend a reservation to `num_blocks` (the request grew during the copy)."""
    more = num_blocks - len(block_ids)
    if more <= 0:
        return True
    taken = engine.block_manager.take_blocks(more)
    if taken is None:
        return False
    block_ids.extend(taken)
    return True


def write(engine: LLMEngine, block_ids: list[int], blocks: torch.Tensor) -> None:
    _scatter(engine, block_ids, blocks)


def release(engine: LLMEngine, block_ids: list[int]) -> None:
    engine.block_manager.release_blocks(block_ids)


def install(engine: LLMEngine, seq: Sequence, block_ids: list[int], num_blocks: int) -> None:
    """Adopt a migrated sequence: it takes the first `num_blocks` reserved blocks (whose
    K/V was written) and is scheduled from the next step on; the rest go back."""
    if seq.request_id in engine.requests:
        raise MigrationAbort("duplicate", f"request {seq.request_id} already runs here")
    adapter = getattr(seq.params, "lora_name", None)
    if adapter is not None:
        if not engine.lora.has(adapter):
            raise MigrationAbort("adapter_missing", f"adapter {adapter!r} is not loaded here")
        seq.lora_uid = engine.lora.ref(adapter)
        # A running sequence must hold a resident slot; if the adapter is not resident
        # yet, the request waits for it and recomputes its K/V (exact either way).
        if seq.status is SequenceStatus.RUNNING and not engine.scheduler._acquire_adapter(seq):
            seq.status = SequenceStatus.WAITING
            seq.num_computed_tokens = 0
            num_blocks = 0
    keep, spare = block_ids[:num_blocks], block_ids[num_blocks:]
    engine.block_manager.release_blocks(spare)
    seq.block_table = keep
    engine.requests[seq.request_id] = [seq]
    if seq.status is SequenceStatus.RUNNING:
        engine.scheduler.running.append(seq)
    else:
        engine.scheduler.waiting.append(seq)
