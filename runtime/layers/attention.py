"""Attention over the paged KV cache.

A step's batch is flattened: T query tokens from S sequences, decodes first (one token
each), then prefill chunks. Each layer's cache is a pair of tensors shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's block table lists the
blocks holding its context in order. New keys/values are written into their slots
before attention reads the context, so a chunk attends to its own tokens too.

The torch path is the reference. On CPUs, decodes use the compiled kernel of
``cpu_kernels`` (falling back to torch without a compiler); on CUDA the Triton kernels
of ``shoal.runtime.kernels.paged_attention`` run every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the KV cache. Built once per step, shared by layers."""

    slot_mapping: torch.Tensor  # [T] int64: flat slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [S] int32: context length after this step
    query_start_loc: list[int]  # S + 1 offsets into the T tokens
    seq_lens_list: list[int]  # seq_lens as Python ints (loops need them without syncs)
    num_decodes: int  # the first num_decodes sequences have exactly one query token

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def build_metadata(
    seqs: Sequence[tuple[int, int, Sequence[int]]],
    block_size: int,
    device: str | torch.device = "cpu",
) -> AttentionMetadata:
    """One step's metadata. ``seqs``: (num_cached, num_new, block_table) per sequence, in
    batch order; sequences with one new token must come first (they are the decodes)."""
    num_decodes = 0
    while num_decodes < len(seqs) and seqs[num_decodes][1] == 1:
        num_decodes += 1
    if any(n == 1 for _, n, _ in seqs[num_decodes:]):
        raise ValueError("single-token sequences (decodes) must come first in the batch")
    slots, starts, lens = [], [0], []
    for cached, new, table in seqs:
        end = cached + new
        if -(-end // block_size) > len(table):
            raise ValueError(f"block table {list(table)} too short for {end} tokens")
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, end)]
        starts.append(starts[-1] + new)
        lens.append(end)
    width = max(len(t) for _, _, t in seqs)
    tables = [list(t) + [0] * (width - len(t)) for _, _, t in seqs]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=starts,
        seq_lens_list=lens,
        num_decodes=num_decodes,
    )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values ([T, Hkv, D]) into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached positions as [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:length]


def paged_attention_torch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference attention: query [T, Hq, D] -> output [T, Hq, D] (cache already written)."""
    out = torch.empty_like(query)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(query[:nd], k_cache, v_cache, meta, scale)
    _prefill_part(query, k_cache, v_cache, meta, scale, out)
    return out


def _prefill_part(
    query, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, key=None, value=None
) -> None:
    """Prefill chunks one sequence at a time. A chunk that is the whole context (nothing
    cached before it) attends to this step's keys/values directly, without a gather."""
    nd = meta.num_decodes
    for i in range(nd, meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        if key is not None and end - start == meta.seq_lens_list[i]:
            out[start:end] = _causal_attention(
                query[start:end], key[start:end], value[start:end], scale
            )
            continue
        out[start:end] = _prefill_attention(
            query[start:end], k_cache, v_cache, meta.block_tables[i], meta.seq_lens_list[i], scale
        )


def _sdpa(q, k, v, **kwargs):
    """SDPA on [H, n, D] inputs. Torch's CPU kernels are several times faster with an
    explicit batch dimension than on 3-D inputs, so one is added."""
    o = F.scaled_dot_product_attention(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        enable_gqa=q.shape[0] != k.shape[0],
        **kwargs,
    )
    return o.squeeze(0)


def _causal_attention(q, k, v, scale: float):
    """[n, H, D] queries over their own n keys, causal."""
    o = _sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale)
    return o.transpose(0, 1)


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """Single-token queries of many sequences, padded to the longest context and masked."""
    nd = q.shape[0]
    block_size = k_cache.shape[1]
    max_len = max(meta.seq_lens_list[:nd])
    num_blocks = -(-max_len // block_size)
    tables = meta.block_tables[:nd, :num_blocks]
    # [nd, blocks, block_size, Hkv, D] -> [nd, Hkv, L, D]
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(num_blocks * block_size, device=q.device)
    mask = positions[None, :] < meta.seq_lens[:nd, None]  # [nd, L]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k,
        v,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o.squeeze(2)


def _prefill_attention(q, k_cache, v_cache, block_table, seq_len: int, scale: float):
    """A chunk of n new tokens at positions seq_len-n .. seq_len-1, causal over the context."""
    n = q.shape[0]
    k = gather_context(k_cache, block_table, seq_len).transpose(0, 1)  # [Hkv, L, D]
    v = gather_context(v_cache, block_table, seq_len).transpose(0, 1)
    if n == seq_len:
        o = _sdpa(q.transpose(0, 1), k, v, is_causal=True, scale=scale)
    else:
        rows = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        cols = torch.arange(seq_len, device=q.device)[None, :]
        o = _sdpa(q.transpose(0, 1), k, v, attn_mask=cols <= rows, scale=scale)
    return o.transpose(0, 1)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Picks the kernel by device."""
    write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    if query.is_cuda:
        from shoal.runtime.kernels.paged_attention import paged_attention_triton

        return paged_attention_triton(query, k_cache, v_cache, meta, scale)
    from shoal.runtime.layers.cpu_kernels import paged_decode_attention_cpu

    nd = meta.num_decodes
    out = torch.empty_like(query)
    if nd:
        decoded = paged_decode_attention_cpu(
            query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale
        )
        if decoded is None:  # no compiler for the kernel: the torch path
            decoded = _decode_attention(query[:nd], k_cache, v_cache, meta, scale)
        if nd == meta.num_seqs:
            return decoded
        out[:nd] = decoded
    _prefill_part(query, k_cache, v_cache, meta, scale, out, key, value)
    return out
