"""Paged attention in Triton: the GPU path of ``shoal.runtime.layers.attention``.

Two entry points, both ``(query, k_cache, v_cache, meta, scale) -> out [T, Hq, D]`` with
the step's K/V already written into the cache:

- ``paged_decode_attention_triton``: a step of decodes only (one query token per sequence).
- ``paged_attention_triton``: any step (decodes first, then prefill chunks that are causal
  within the chunk and see their sequence's earlier context from the cache).

One kernel body serves both. A program owns a tile of query rows of one sequence and one
KV head: ``BLOCK_Q`` query tokens times the ``GROUP`` query heads that share that KV head
(GQA), so each K/V tile is loaded once for the whole group. It walks the sequence's
context ``TILE_N`` positions at a time, looks each position's page up in the block table
(so any page size works and a tile may span pages), and keeps an online softmax in fp32
(running max, running sum, fp32 accumulator). Decodes get one program per (sequence, KV
head); a prefill chunk gets one per (``BLOCK_Q`` tokens of the chunk, KV head). When
decodes alone would leave SMs idle (few sequences, long contexts), each context is cut
into splits run as separate programs, and ``_combine_splits_kernel`` merges their
softmax states (flash-decoding; ``tiling.decode_splits`` decides).

VERIFIED ONLY UNDER THE INTERPRETER: no GPU was available while this was written.
tests/test_triton_attention.py checks, with ``TRITON_INTERPRET=1`` on CPU, against
``paged_attention_torch``: decode-only and mixed steps (and prefill only); MHA and GQA
(Hq/Hkv = 1, 2, 4, and 7); head_dim 32 and 64 (and 48, through the padded ``BLOCK_D``
path); page sizes 16 and 32 (and 8, smaller than a tile); contexts crossing page
boundaries; shuffled block tables; one-token chunks and chunks longer than ``BLOCK_Q``;
strided (non-contiguous) queries; split decodes (including empty splits); fp32, bf16 and
fp16 inputs; the ValueErrors for bad inputs; and a tiny Llama run step by step over
these kernels, logits equal to the torch path's within 1e-4. Under the interpreter every
``tl.dot`` runs on fp32 operands (``DOT_FP32``), because the interpreter's bf16 dot
returns garbage.
Checked without a GPU: both kernels compile for sm_90 (H100/H200) through Triton's
NVIDIA backend for bf16/fp16/fp32 at served shapes, and ptxas reports no register spills
at 16-bit for head_dim up to 256 (fp32 spills at head_dim 256) and shared memory in
bounds.
Never run: the compiled kernels themselves, so the bf16 tensor-core dots
(``DOT_FP32=False``: P is cast to the cache dtype before ``P @ V``, as FlashAttention
does), ``input_precision="ieee"`` for fp32 on GPU, the SM count read for splitting, and
speed (tile sizes, warp counts and split thresholds are untuned; see ``tiling``). A
first GPU run should repeat the interpreter tests without ``TRITON_INTERPRET`` on CUDA
tensors before this path is trusted.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shoal.runtime.kernels.tiling import (
    choose_tiles,
    decode_splits,
    next_power_of_2,
    prefill_tiles,
    rows_of_equal_width,
    split_size_for,
)
from shoal.runtime.layers.attention import AttentionMetadata

# triton.jit picks the interpreter or the compiler when a kernel is decorated, i.e. when
# this module is imported; the launcher must agree with that choice (see DOT_FP32).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    tile_seq_ptr,
    tile_start_ptr,
    partial_acc_ptr,
    partial_m_ptr,
    partial_l_ptr,
    split_size,
    num_heads,
    num_splits,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DECODE_ONLY: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:
        # Decodes lead the batch with one token each: program i is sequence i, token i.
        seq = tile
        first_tok = tile
        seq_q_start = tile
        seq_q_end = tile + 1
    else:
        seq = tl.load(tile_seq_ptr + tile)
        first_tok = tl.load(tile_start_ptr + tile)
        seq_q_start = tl.load(query_start_loc_ptr + seq)
        seq_q_end = tl.load(query_start_loc_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The chunk's tokens are the last (seq_q_end - seq_q_start) positions of the context.
    context_start = seq_len - (seq_q_end - seq_q_start)

    # Row r is query token first_tok + r // GROUP under query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = first_tok + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (tok < seq_q_end)
    q_pos = context_start + (tok - seq_q_start)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # A finite start for the running max keeps exp2(m_old - m_new) at 0 or 1, never NaN,
    # while a tile is entirely masked for some rows.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Context this tile can see: up to and including its last valid query token. A split
    # program sees only its own slice of it (possibly empty for a short sequence).
    last_tok = tl.minimum(first_tok + BLOCK_Q, seq_q_end) - 1
    kv_len = context_start + (last_tok - seq_q_start) + 1
    if SPLIT:
        kv_begin = split * split_size
        kv_end = tl.minimum(kv_len, kv_begin + split_size)
    else:
        kv_begin = 0
        kv_end = kv_len
    for n_start in range(kv_begin, kv_end, TILE_N):
        k_pos = n_start + tl.arange(0, TILE_N)
        k_ok = k_pos < kv_end
        page = tl.load(
            block_tables_ptr + seq * stride_bt + k_pos // PAGE_SIZE, mask=k_ok, other=0
        ).to(tl.int64)  # int64: page * stride overflows int32 on large caches
        in_page = k_pos % PAGE_SIZE
        kv_mask = d_ok[None, :] & k_ok[:, None]
        k = tl.load(
            k_cache_ptr
            + page[:, None] * stride_kb
            + in_page[:, None] * stride_ks
            + kv_head * stride_kh
            + d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )  # [TILE_N, BLOCK_D]
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_cache_ptr
            + page[:, None] * stride_vb
            + in_page[:, None] * stride_vs
            + kv_head * stride_vh
            + d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )  # [TILE_N, BLOCK_D]
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        # Unnormalised state of this slice, merged by _combine_splits_kernel.
        part = (tok * num_heads + head) * num_splits + split
        tl.store(
            partial_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
            acc,
            mask=row_ok[:, None] & d_ok[None, :],
        )
        tl.store(partial_m_ptr + part, m_i, mask=row_ok)
        tl.store(partial_l_ptr + part, l_i, mask=row_ok)
    else:
        # Every valid row sees at least its own position, so l_i > 0 there; padding rows
        # are not stored, the guard only keeps them free of NaN.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    partial_acc_ptr,
    partial_m_ptr,
    partial_l_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[t, h] from the split states of (token t, head h): rescale each split's sums to
    the largest running max (log2 domain, as the attention kernel keeps them), add, divide."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    part = (tok * num_heads + head) * num_splits + s
    m = tl.load(partial_m_ptr + part, mask=s_ok, other=-1.0e30)
    l_sum = tl.load(partial_l_ptr + part, mask=s_ok, other=0.0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.load(
        partial_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # Empty splits carry m = -1e30 and l = 0, so their weight is 0.
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l_sum, 0)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


def _check_inputs(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Clear errors for inputs the kernel would silently misread."""
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected query [T, Hq, D] and k/v caches [num_blocks, block_size, Hkv, D], got "
            f"query {tuple(query.shape)}, k_cache {tuple(k_cache.shape)}, "
            f"v_cache {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim differs: query {head_dim}, cache {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if not (query.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"dtypes differ: query {query.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
        )
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {query.dtype}")
    devices = {t.device for t in (query, k_cache, v_cache, meta.block_tables, meta.seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    if query.shape[0] != meta.query_start_loc[-1]:
        raise ValueError(
            f"query has {query.shape[0]} tokens, metadata describes {meta.query_start_loc[-1]}"
        )


def _launch(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_programs: int,
    decode: bool,
    schedule: torch.Tensor | None = None,
    num_splits: int = 1,
    split_size: int = 0,
) -> None:
    """One launch of the attention kernel; with ``num_splits > 1`` (decodes only) a second
    launch merges the splits into ``out``."""
    num_heads = query.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2:]
    group = num_heads // num_kv_heads
    cfg = choose_tiles(group, head_dim, decode, query.element_size())
    split = num_splits > 1
    if split:
        shape = (num_programs, num_heads, num_splits)
        partial_acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=query.device)
        partial_ml = torch.empty((2, *shape), dtype=torch.float32, device=query.device)
    # Unused pointer arguments still need a tensor; seq_lens is at hand.
    unused = meta.seq_lens
    _paged_attention_kernel[(num_programs, num_kv_heads, num_splits)](
        out,
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        unused if schedule is None else schedule[0],  # query_start_loc
        unused if schedule is None else schedule[1],  # tile -> sequence
        unused if schedule is None else schedule[2],  # tile -> first token
        partial_acc if split else unused,
        partial_ml[0] if split else unused,
        partial_ml[1] if split else unused,
        split_size,
        num_heads,
        num_splits,
        scale * _LOG2E,
        *query.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        meta.block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        GROUP=group,
        BLOCK_M=cfg.block_m,
        BLOCK_Q=cfg.block_q,
        TILE_N=cfg.tile_n,
        PAGE_SIZE=k_cache.shape[1],
        DECODE_ONLY=decode,
        SPLIT=split,
        DOT_FP32=INTERPRETED,
        # fp32 caches get exact fp32 dots rather than TF32's 10-bit mantissa.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
    )
    if split:
        _combine_splits_kernel[(num_programs, num_heads)](
            out,
            partial_acc,
            partial_ml[0],
            partial_ml[1],
            num_heads,
            num_splits,
            *out.stride(),
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.block_d,
            BLOCK_S=next_power_of_2(num_splits),
        )


def _launch_decodes(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None,
) -> None:
    """The first ``meta.num_decodes`` tokens, split along the context when that helps."""
    nd = meta.num_decodes
    group = query.shape[1] // k_cache.shape[2]
    tile_n = choose_tiles(group, query.shape[2], True, query.element_size()).tile_n
    max_context = max(meta.seq_lens_list[:nd])
    if num_splits is None:
        num_sms = (
            torch.cuda.get_device_properties(query.device).multi_processor_count
            if query.is_cuda
            else 1
        )
        splits, size = decode_splits(nd, k_cache.shape[2], max_context, tile_n, num_sms)
    else:
        splits, size = split_size_for(max_context, num_splits, tile_n)
    _launch(
        out, query, k_cache, v_cache, meta, scale, nd, decode=True, num_splits=splits,
        split_size=size,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _prefill_schedule(
    query_start_loc: tuple[int, ...], first_seq: int, block_q: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The prefill tiles of a step on ``device``: rows (query_start_loc, tile -> sequence,
    tile -> first token), and the number of tiles. Every layer of a step asks for the same
    schedule, so it is built and copied to the device once per step, not once per layer.
    Keyed by value, so a metadata object reused with new contents cannot get a stale one.
    The kernels only read it."""
    tile_seq, tile_start = prefill_tiles(list(query_start_loc), first_seq, block_q)
    rows = rows_of_equal_width(list(query_start_loc), tile_seq, tile_start)
    return torch.tensor(rows, dtype=torch.int32).to(device), len(tile_seq)


def paged_decode_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention for a step of decodes only: query [S, Hq, D] -> out [S, Hq, D].

    ``num_splits``: cut each context into up to this many parts run in parallel and merged
    (flash-decoding); None picks by the GPU's SM count (``tiling.decode_splits``)."""
    _check_inputs(query, k_cache, v_cache, meta)
    if meta.num_decodes != meta.num_seqs or query.shape[0] != meta.num_seqs:
        raise ValueError(
            f"decode kernel needs one token per sequence: {query.shape[0]} tokens, "
            f"{meta.num_seqs} sequences, {meta.num_decodes} decodes"
        )
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if meta.num_seqs:
        _launch_decodes(out, query, k_cache, v_cache, meta, scale, num_splits)
    return out


def paged_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention for any step: decodes then prefill chunks, query [T, Hq, D] -> [T, Hq, D].

    Two launches writing disjoint rows of ``out``: the decodes as in
    ``paged_decode_attention_triton`` (``num_splits`` applies to them), the chunks with
    prefill tiles, so a decode does not occupy a 64-row tile on its own.
    """
    _check_inputs(query, k_cache, v_cache, meta)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    nd = meta.num_decodes
    if nd:
        _launch_decodes(out, query, k_cache, v_cache, meta, scale, num_splits)
    if nd < meta.num_seqs:
        group = query.shape[1] // k_cache.shape[2]
        cfg = choose_tiles(group, query.shape[2], False, query.element_size())
        schedule, num_tiles = _prefill_schedule(
            tuple(meta.query_start_loc), nd, cfg.block_q, query.device
        )
        _launch(
            out, query, k_cache, v_cache, meta, scale, num_tiles, decode=False,
            schedule=schedule,
        )  # fmt: skip
    return out
