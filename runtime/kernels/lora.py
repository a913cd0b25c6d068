"""Gathered multi-LoRA matmul (BGMV): many adapters in one batch over shared base weights.

For every token t of a step whose request uses adapter slot ``s = indices[t]``::

    y[t] += (x[t] @ lora_a[s]) @ lora_b[s] * scales[s]

and tokens with ``indices[t] == -1`` (base-only requests) are left alone. Slots are the
rows of the resident adapter pool; an adapter of rank r below the pool's rank fills the
rest of its A columns / B rows with zeros, which add nothing.

Shapes (logical; any strides are honoured, so ``y`` may be a column slice of a fused qkv
or gate/up output, and the pool may store PEFT's layouts as transposed views):

- ``x`` [T, in_dim], ``y`` [T, out_dim], same dtype;
- ``lora_a`` [num_slots, in_dim, rank], ``lora_b`` [num_slots, rank, out_dim], x's dtype;
- ``indices`` [T] integer, -1 or a slot; ``scales`` [num_slots] (alpha / r, or
  alpha / sqrt(r) for rsLoRA).

For the Triton kernel, store A as [num_slots, rank, in_dim] (PEFT's ``lora_A.weight``
stacked) and pass ``.transpose(1, 2)``, and B as [num_slots, rank, out_dim] (PEFT's
``lora_B.weight`` transposed): each program then reads contiguous rows.

``bgmv`` picks the path by device: the torch path here on CPU, the Triton kernels in
``shoal.runtime.kernels.lora_triton`` on CUDA.
"""

from __future__ import annotations

import torch


def check_bgmv_inputs(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Clear errors for shapes and dtypes that would be misread. Slot values are not
    checked: that would cost a device sync per call; the adapter pool hands them out."""
    if x.dim() != 2 or y.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            "expected x [T, in], y [T, out], lora_a [slots, in, rank], lora_b [slots, rank, out];"
            f" got x {tuple(x.shape)}, y {tuple(y.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}"
        )
    num_tokens, in_dim = x.shape
    slots, a_in, rank = lora_a.shape
    if (
        y.shape[0] != num_tokens
        or a_in != in_dim
        or lora_b.shape[:2] != (slots, rank)
        or lora_b.shape[2] != y.shape[1]
    ):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if indices.shape != (num_tokens,) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"indices must be [{num_tokens}] int32/int64, got {tuple(indices.shape)} "
            f"{indices.dtype}"
        )
    if scales.shape != (slots,):
        raise ValueError(f"scales must be [{slots}], got {tuple(scales.shape)}")
    if not (x.dtype == y.dtype == lora_a.dtype == lora_b.dtype):
        raise ValueError(
            f"dtypes differ: x {x.dtype}, y {y.dtype}, lora_a {lora_a.dtype}, lora_b {lora_b.dtype}"
        )


def bgmv_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """The reference and CPU path: adds each token's LoRA delta to ``y`` in place.

    Groups tokens by slot and does two small matmuls per adapter present in the batch,
    rather than gathering a weight matrix per token (which would copy in*rank values per
    token). Computes in x's dtype, as the base layer's matmul does.
    """
    check_bgmv_inputs(y, x, lora_a, lora_b, indices, scales)
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        delta = (x[rows] @ lora_a[slot]) @ lora_b[slot]
        y[rows] += delta * float(scales[slot])
    return y


def bgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """``y[t] += (x[t] @ A[s]) @ B[s] * scale[s]`` for ``s = indices[t] >= 0``; returns y."""
    if x.is_cuda:
        from shoal.runtime.kernels.lora_triton import bgmv_triton

        return bgmv_triton(y, x, lora_a, lora_b, indices, scales)
    return bgmv_torch(y, x, lora_a, lora_b, indices, scales)
