"""How the paged-attention kernel cuts a step into programs. Pure: no torch, no Triton.

Kept apart from the kernel so the scheduling rules can be tested without importing Triton
(which fixes interpreter-or-compiler for the whole process at import time).
"""

from __future__ import annotations

from dataclasses import dataclass


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tl.arange extents must be powers of two)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
    """Compile-time tile shape for one launch."""

    block_m: int  # query rows per program (tokens x heads of a group); >= 16 for tl.dot
    block_q: int  # query tokens per program: block_m // group
    tile_n: int  # context positions per inner iteration; >= 16 for tl.dot
    block_d: int  # head_dim padded to a power of two (>= 16)
    num_warps: int


def choose_tiles(group: int, head_dim: int, decode: bool, elem_bytes: int = 2) -> TileConfig:
    """Tile shape for a launch; ``group`` is query heads per KV head, ``elem_bytes`` the
    size of a cache element (2 for bf16/fp16, 4 for fp32).

    A decode has one query token, so its rows are just the group, padded to 16 (the
    smallest tl.dot); prefill tiles take 64 rows (32 past head_dim 128), i.e.
    ``block_m // group`` tokens of a chunk. The sizes and warp counts were picked so that
    ptxas reports no register spills for sm_90 at bf16 and head_dim up to 256; they were
    not timed on a GPU. fp32 (a correctness path on GPUs) gets smaller tiles and 8 warps.
    """
    if group < 1 or head_dim < 1 or elem_bytes not in (2, 4):
        raise ValueError(
            f"need group >= 1, head_dim >= 1, elem_bytes 2 or 4; got {group}, {head_dim}, "
            f"{elem_bytes}"
        )
    block_d = max(16, next_power_of_2(head_dim))
    group_rows = next_power_of_2(group)
    rows = 16 if decode else (64 if block_d <= 128 else 32)
    block_m = max(rows, group_rows)
    wide = elem_bytes == 4 or (not decode and block_d >= 128)
    return TileConfig(
        block_m=block_m,
        block_q=1 if decode else block_m // group,
        tile_n=64 if block_d <= 64 and elem_bytes == 2 else 32,
        block_d=block_d,
        num_warps=8 if wide else 4,
    )


def prefill_tiles(
    query_start_loc: list[int], first_seq: int, block_q: int
) -> tuple[list[int], list[int]]:
    """Cut every sequence from ``first_seq`` on into tiles of at most ``block_q`` query
    tokens. Returns (sequence index, first token index) per tile."""
    seqs: list[int] = []
    starts: list[int] = []
    for i in range(first_seq, len(query_start_loc) - 1):
        for start in range(query_start_loc[i], query_start_loc[i + 1], block_q):
            seqs.append(i)
            starts.append(start)
    return seqs, starts


def rows_of_equal_width(*rows: list[int]) -> list[list[int]]:
    """Pad lists with zeros to one width so they travel to the device as one tensor."""
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]


# A split of a decode's context is worth its combine step only past this many positions.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 32


def split_size_for(max_context: int, num_splits: int, tile_n: int) -> tuple[int, int]:
    """(num_splits, split_size) that cover ``max_context`` positions in at most
    ``num_splits`` parts, each a multiple of ``tile_n``; fewer parts if fewer suffice."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    per_split = -(-max(max_context, 1) // num_splits)
    split_size = -(-per_split // tile_n) * tile_n
    return -(-max(max_context, 1) // split_size), split_size


def decode_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, tile_n: int, num_sms: int
) -> tuple[int, int]:
    """(num_splits, split_size) for a decode launch (flash-decoding).

    A decode program per (sequence, KV head) walks its whole context alone; with fewer
    programs than the GPU has SMs (few sequences, few KV heads, long contexts) most SMs
    idle. Then each context is cut into splits that run as separate programs and a second
    kernel merges their softmax states. Aims at about two programs per SM, never splits
    below ``MIN_SPLIT_TOKENS`` positions. Untuned: no GPU was at hand.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = -(-2 * num_sms // programs)
    splits = max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))
    return split_size_for(max_context, splits, tile_n)
