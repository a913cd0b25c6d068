"""BGMV in Triton: the CUDA path of ``shoal.runtime.kernels.lora.bgmv`` (shapes there).

Two launches, as in Punica and S-LoRA: *shrink* computes ``h[t] = x[t] @ A[s]`` (one
program per token, rank-wide, fp32) and *expand* adds ``h[t] @ B[s] * scale[s]`` to
``y[t]`` (one program per token and ``BLOCK_N`` output columns). Splitting them keeps
``x @ A`` from being recomputed for every block of output columns. Tokens with slot -1
do nothing. Each token is a matrix-vector product, so the kernels multiply and reduce
elementwise in fp32 instead of using ``tl.dot`` (which needs 16 rows); that also keeps
them clear of the interpreter's broken bf16 dot.

VERIFIED ONLY UNDER THE INTERPRETER (no GPU here): tests/test_triton_lora.py checks both
kernels with ``TRITON_INTERPRET=1`` against ``bgmv_torch`` on fp32 inputs (fp32 and bf16
tensors), mixed slots and -1, ranks that are not powers of two, dimensions that are not
multiples of the blocks, a strided ``y`` (a column slice of a fused output) and A given
as a transposed view; and that both compile for sm_90 without a GPU. Never run compiled;
block sizes are untuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shoal.runtime.kernels.lora import check_bgmv_inputs
from shoal.runtime.kernels.tiling import next_power_of_2

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def lora_blocks(in_dim: int, rank: int, out_dim: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_R, BLOCK_N): the rank padded to a power of two, and input/output
    blocks sized so one [block, rank] weight tile stays near 8K elements."""
    block_r = next_power_of_2(rank)
    budget = max(16, 8192 // block_r)
    block_k = min(budget, next_power_of_2(in_dim))
    block_n = min(budget, next_power_of_2(out_dim))
    return block_k, block_r, block_n


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    indices_ptr,
    h_ptr,
    in_dim,
    rank,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ak,
    stride_ar,
    stride_ht,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(indices_ptr + t).to(tl.int64)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, in_dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < in_dim
            xv = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_ok, other=0.0)
            av = tl.load(
                a_ptr + slot * stride_as + k[:, None] * stride_ak + r[None, :] * stride_ar,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(xv.to(tl.float32)[:, None] * av.to(tl.float32), 0)
        tl.store(h_ptr + t * stride_ht + r, acc, mask=r_ok)


@triton.jit
def _lora_expand_kernel(
    h_ptr,
    b_ptr,
    indices_ptr,
    scales_ptr,
    y_ptr,
    out_dim,
    rank,
    stride_ht,
    stride_bs,
    stride_br,
    stride_bn,
    stride_yt,
    stride_yn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(indices_ptr + t).to(tl.int64)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < out_dim
        h = tl.load(h_ptr + t * stride_ht + r, mask=r_ok, other=0.0)
        bv = tl.load(
            b_ptr + slot * stride_bs + r[:, None] * stride_br + n[None, :] * stride_bn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        delta = tl.sum(h[:, None] * bv.to(tl.float32), 0) * tl.load(scales_ptr + slot)
        y_ptrs = y_ptr + t * stride_yt + n * stride_yn
        y = tl.load(y_ptrs, mask=n_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_ok)


def bgmv_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """``y[t] += (x[t] @ A[s]) @ B[s] * scale[s]`` for ``s = indices[t] >= 0``; returns y.

    Computes in fp32 and rounds once, into y's dtype."""
    check_bgmv_inputs(y, x, lora_a, lora_b, indices, scales)
    devices = {t.device for t in (y, x, lora_a, lora_b, indices, scales)}
    if len(devices) != 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    num_tokens, in_dim = x.shape
    rank, out_dim = lora_b.shape[1:]
    if num_tokens == 0 or rank == 0 or out_dim == 0:
        return y
    block_k, block_r, block_n = lora_blocks(in_dim, rank, out_dim)
    h = torch.empty((num_tokens, rank), dtype=torch.float32, device=x.device)
    scales = scales.to(torch.float32)
    _lora_shrink_kernel[(num_tokens,)](
        x,
        lora_a,
        indices,
        h,
        in_dim,
        rank,
        *x.stride(),
        *lora_a.stride(),
        h.stride(0),
        BLOCK_K=block_k,
        BLOCK_R=block_r,
    )
    _lora_expand_kernel[(num_tokens, triton.cdiv(out_dim, block_n))](
        h,
        lora_b,
        indices,
        scales,
        y,
        out_dim,
        rank,
        h.stride(0),
        *lora_b.stride(),
        *y.stride(),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
    )
    return y
