"""Tensors in, tokens out: owns the model and the KV cache tensors, turns a scheduled
step into flat input tensors plus attention metadata, runs the forward pass and samples.
"""

from __future__ import annotations

import logging

import torch

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.sampler import Sampler, SampleResult
from shoal.runtime.engine.scheduler import ScheduledSeq
from shoal.runtime.layers.attention import build_metadata

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kv_bytes_per_block(
    num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype
) -> int:
    return (
        2
        * num_layers
        * block_size
        * kv_heads
        * head_dim
        * torch.empty(0, dtype=dtype).element_size()
    )


class ModelRunner:
    def __init__(self, config: EngineConfig):
        from shoal.runtime.models import load_model

        self.config = config
        self.device = resolve_device(config.device)
        dtype = _DTYPES.get(config.dtype, config.dtype)
        self.model, self.info = load_model(config.model, dtype=dtype, device=self.device)
        self.model.eval()
        self.block_size = config.block_size
        per_block = kv_bytes_per_block(
            self.info.num_layers,
            self.block_size,
            self.info.num_kv_heads,
            self.info.head_dim,
            self.info.dtype,
        )
        self.num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory // per_block)
        shape = (self.num_blocks, self.block_size, self.info.num_kv_heads, self.info.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.info.dtype, device=self.device),
                torch.zeros(shape, dtype=self.info.dtype, device=self.device),
            )
            for _ in range(self.info.num_layers)
        ]
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s) on %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * per_block / 2**20,
            self.info.dtype,
            self.device,
        )
        self.sampler = Sampler(config.seed)
        from shoal.runtime.lora.pool import LoRAPool

        # Adapter slots are allocated at the first adapter's swap-in: none, no cost.
        self.lora = LoRAPool(
            self.model,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras,
            dtype=self.info.dtype,
            device=self.device,
        )

    def prepare(self, scheduled: list[ScheduledSeq]):
        """Flatten the step: token ids and positions, plus the attention metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        for s in scheduled:
            start = s.seq.num_computed_tokens
            if s.num_new_tokens == 1:
                input_ids.append(s.seq.token_at(start))
            else:
                input_ids.extend(s.seq.token_ids[start : start + s.num_new_tokens])
            positions.extend(range(start, start + s.num_new_tokens))
        meta = build_metadata(
            [(s.seq.num_computed_tokens, s.num_new_tokens, s.seq.block_table) for s in scheduled],
            self.block_size,
            self.device,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> SampleResult:
        """Run one step; sample for the sequences whose prompt is complete after it."""
        ids, pos, meta = self.prepare(scheduled)
        self.lora.set_step([(s.seq.lora_slot, s.num_new_tokens) for s in scheduled])
        try:
            hidden = self.model(ids, pos, self.kv_caches, meta)
        finally:
            self.lora.clear_step()
        rows = [i for i, s in enumerate(scheduled) if s.completes_prompt]
        if not rows:
            return SampleResult([], [])
        last = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last))
        return self.sampler(logits, [scheduled[i].seq for i in rows])
