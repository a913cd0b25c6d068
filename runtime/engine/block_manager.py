"""Paged KV-cache bookkeeping: fixed-size blocks, block tables, reference counts and
prefix caching.

A block that is full is identified by the hash of its tokens chained with the hash of
the block before it, so equal hashes mean equal prefixes. Full blocks stay findable by
hash after their last owner frees them; such unreferenced blocks form the free queue in
least-recently-freed order, and allocation takes the oldest first (LRU eviction of the
prefix cache). This file holds no tensors: the cache itself lives in the model runner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shoal.runtime.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its K/V computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, oldest first; cached ones keep their hash until reused.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up (for metrics)
        self.prefix_hits = 0

    # ---- accounting -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    # ---- prefix cache -------------------------------------------------------------
    @staticmethod
    def root_hash(seq: Sequence) -> int | None:
        """The first block's parent: the adapter, so that KV computed under one adapter
        is never reused by another (or by the base model)."""
        return hash(("lora", seq.lora_uid)) if seq.lora_uid else None

    def _full_block_hashes(
        self, tokens: list[int], num_blocks: int, root: int | None = None
    ) -> list[int]:
        hashes, parent, bs = [], root, self.block_size
        for i in range(num_blocks):
            parent = block_hash(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            hashes.append(parent)
        return hashes

    def attach_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence about to be scheduled with no blocks: take the cached blocks
        of its longest cached prefix. At least one token is left to compute, since the
        step that computes it produces the next token's logits. Returns tokens hit."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        for h in self._full_block_hashes(tokens, max_blocks, self.root_hash(seq)):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def count_prefix_lookup(self, seq: Sequence) -> None:
        """Count a request's prompt lookup once, when it is first admitted."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled, so later requests share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        first_new = num_full  # blocks are hashed in order: walk back to the last hashed one
        while first_new > 0 and self.blocks[seq.block_table[first_new - 1]].hash is None:
            first_new -= 1
        if first_new == num_full:
            return
        parent = (
            self.blocks[seq.block_table[first_new - 1]].hash if first_new else self.root_hash(seq)
        )
        tokens, bs = seq.token_ids, self.block_size
        for i in range(first_new, num_full):
            parent = block_hash(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self.blocks[seq.block_table[i]]
            block.hash = parent
            # A twin computed concurrently by another request keeps the map entry.
            self.cached.setdefault(parent, block.block_id)

    # ---- allocation -----------------------------------------------------------------
    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its contents are about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_new_tokens` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            raise RuntimeError("allocate() called without can_allocate()")
        seq.block_table.extend(self._take_free_block() for _ in range(needed))

    def take_blocks(self, n: int) -> list[int] | None:
        """Reserve `n` blocks outside any sequence (a migration target holding room for
        an incoming request); None if fewer are free."""
        if n > len(self.free):
            return None
        return [self._take_free_block() for _ in range(n)]

    def release_blocks(self, block_ids: list[int]) -> None:
        """Give back blocks from take_blocks() that no sequence adopted."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go to the free queue first so
        that shared prefixes are evicted last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
