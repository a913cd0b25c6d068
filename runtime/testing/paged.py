"""Running a model over the paged KV cache without the engine: for model tests.

``build_metadata`` (the engine's own, from ``layers.attention``) makes the
AttentionMetadata of one step from (tokens already cached, new tokens, block table) per
sequence; ``prefill_metadata`` and ``decode_metadata`` cover the simple cases. ``PagedRunner`` keeps caches and block tables for a few sequences and
runs steps that mix them, as the engine would, minus scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.runtime.layers.attention import AttentionMetadata, build_metadata


def prefill_metadata(
    num_tokens: int,
    block_size: int,
    *,
    start: int = 0,
    block_table: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> AttentionMetadata:
    """One sequence computing positions [start, start + num_tokens); by default its blocks
    are 0, 1, 2, ... (contiguous)."""
    end = start + num_tokens
    table = list(block_table) if block_table is not None else list(range(-(-end // block_size)))
    return build_metadata([(start, num_tokens, table)], block_size, device)


def decode_metadata(
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: str | torch.device = "cpu",
) -> AttentionMetadata:
    """One new token per sequence, at position ``context_lens[i]`` (tokens cached before)."""
    return build_metadata(
        [(n, 1, t) for n, t in zip(context_lens, block_tables, strict=True)], block_size, device
    )


def allocate_kv_caches(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


class PagedRunner:
    """A model plus its KV caches; runs steps over several sequences.

    Blocks are handed out from the *end* of the pool downwards, so block tables are not
    the identity and a bug that ignores them shows up.
    """

    def __init__(self, model, info, num_blocks: int = 64, block_size: int = 4) -> None:
        self.model = model
        self.block_size = block_size
        device = next(model.parameters()).device
        self.device = device
        self.kv_caches = allocate_kv_caches(
            info.num_layers, info.num_kv_heads, info.head_dim, num_blocks, block_size,
            info.dtype, device,
        )  # fmt: skip
        self.free = list(range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = {}

    @torch.inference_mode()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Feed each sequence its next tokens (one token = a decode); returns float32 logits
        [len(chunk), vocab] per sequence. Decodes are ordered first, as the engine does."""
        order = sorted(chunks, key=lambda s: len(chunks[s]) != 1)
        seqs, ids, positions = [], [], []
        for s in order:
            cached, new = self.lens.get(s, 0), chunks[s]
            table = self.tables.setdefault(s, [])
            while len(table) * self.block_size < cached + len(new):
                table.append(self.free.pop())
            seqs.append((cached, len(new), table))
            ids += new
            positions += range(cached, cached + len(new))
        meta = build_metadata(seqs, self.block_size, self.device)
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            meta,
        )
        logits = self.model.compute_logits(hidden)
        out, offset = {}, 0
        for s in order:
            n = len(chunks[s])
            out[s] = logits[offset : offset + n]
            offset += n
            self.lens[s] = self.lens.get(s, 0) + n
            self.tokens.setdefault(s, []).extend(chunks[s])
        return out

    def greedy(
        self, seq: str, prompt: list[int], max_new_tokens: int, chunk_size: int | None = None
    ) -> list[int]:
        """Prefill ``prompt`` (in chunks of ``chunk_size``), then decode greedily."""
        chunk_size = chunk_size or len(prompt)
        for i in range(0, len(prompt), chunk_size):
            logits = self.step({seq: prompt[i : i + chunk_size]})[seq]
        out = []
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            out.append(token)
            logits = self.step({seq: [token]})[seq]
        return out
