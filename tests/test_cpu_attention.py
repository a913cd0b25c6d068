"""The compiled CPU decode-attention kernel equals the torch reference path."""

from __future__ import annotations

import pytest
import torch

from shoal.runtime.layers.attention import AttentionMetadata, paged_attention_torch
from shoal.runtime.layers.cpu_kernels import load, paged_decode_attention_cpu

pytestmark = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernel")


def decode_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks out of order
    tables, used = [], 0
    for b in blocks_per_seq:
        tables.append(order[used : used + b])
        used += b
    width = max(blocks_per_seq)
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    query = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        block_tables=table_tensor,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=list(range(len(lens) + 1)),
        seq_lens_list=list(lens),
        num_decodes=len(lens),
    )
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads", [(8, 4), (4, 4), (8, 2)])
@pytest.mark.parametrize("head_dim,block_size", [(16, 4), (64, 16), (32, 32)])
def test_kernel_matches_torch(dtype, atol, heads, head_dim, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 57]
    query, k, v, meta = decode_case(lens, *heads, head_dim, block_size, dtype)
    want = paged_attention_torch(query, k, v, meta, head_dim**-0.5)
    got = paged_decode_attention_cpu(query, k, v, meta.block_tables, meta.seq_lens, head_dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
