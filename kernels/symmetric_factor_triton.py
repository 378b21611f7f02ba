"""The Kronecker-factor EMA with one triangle computed, as one Triton kernel over a bucket.

``F <- beta F + (1 - beta) G G^T`` for a stack of factors ``F (B, d, d)`` and unfolded
gradients ``G (B, d, r)``. F stays symmetric, so only the output tiles on and below the diagonal
are computed (about half of the multiply-adds of ``baddbmm``) and each entry below the diagonal
is stored twice, at its place and at its mirror; the result is exactly symmetric by construction
(on any BLAS under the interpreter, any GPU): a diagonal tile keeps its lower triangle and
mirrors it. The result depends only on the old factor's lower triangle.

The torch definition of correct is ``F.baddbmm_(G, G.mT, beta=beta, alpha=1 - beta)``
(:func:`distsoap.math.rotations.update_factors`); the two differ by the order of the fp32
sums. The products are fp32 (``input_precision="ieee"``: no TF32, like torch's default fp32
matmul). This kernel is not used by the optimizer: the issue asks for it only where it measures
faster than cuBLAS, which needs a GPU (``benchmarks/bench_kernels.py --device cuda`` times both).
It runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INT32_MAX = 2**31 - 1


def largest_offset(tensor: torch.Tensor) -> int:
    """The element offset of a tensor's last element from its first, given its strides."""
    return sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def needs_wide_index(factor: torch.Tensor, unfolded: torch.Tensor) -> bool:
    """Whether addressing these tensors needs int64 offsets (int32 ones would wrap around).

    Each term of an address (batch, row or column times its stride) is at most the largest
    offset, so int32 is safe while that fits. Masked lanes beyond the edges may wrap, but they
    are never read or written.
    """
    if factor.numel() == 0 or unfolded.numel() == 0:
        return False
    return max(largest_offset(factor), largest_offset(unfolded)) > INT32_MAX


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block, block_k, warps, stages in (
            (64, 32, 4, 3),
            (64, 64, 4, 3),
            (128, 32, 8, 3),
            (128, 64, 8, 2),
        )
    ]


@triton.autotune(configs=_configs(), key=["d", "r"], restore_value=["f_ptr"])
@triton.jit
def _symmetric_factor_kernel(
    f_ptr,
    g_ptr,
    d,
    r,
    stride_fb,
    stride_fr,
    stride_fc,
    stride_gb,
    stride_gr,
    stride_gc,
    beta,
    WIDE_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)  # the pair-th tile of the lower triangle, row by row
    batch = tl.program_id(1)
    tile_row = ((tl.sqrt(8.0 * pair + 1.0) - 1.0) * 0.5).to(tl.int32)
    tile_row += ((tile_row + 1) * (tile_row + 2) // 2 <= pair).to(tl.int32)  # sqrt rounding
    tile_row -= (tile_row * (tile_row + 1) // 2 > pair).to(tl.int32)
    tile_col = pair - tile_row * (tile_row + 1) // 2
    if WIDE_INDEX:  # an offset of 2^31 or more: int32 products with the strides would wrap
        batch = batch.to(tl.int64)
        tile_row = tile_row.to(tl.int64)
        tile_col = tile_col.to(tl.int64)
    rows = tile_row * BLOCK + tl.arange(0, BLOCK)
    cols = tile_col * BLOCK + tl.arange(0, BLOCK)
    g = g_ptr + batch * stride_gb
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for start in range(0, r, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        if WIDE_INDEX:
            k = k.to(tl.int64)
        left = tl.load(
            g + rows[:, None] * stride_gr + k[None, :] * stride_gc,
            mask=(rows[:, None] < d) & (k[None, :] < r),
            other=0.0,
        ).to(tl.float32)  # G[rows, k]
        right = tl.load(
            g + cols[None, :] * stride_gr + k[:, None] * stride_gc,
            mask=(cols[None, :] < d) & (k[:, None] < r),
            other=0.0,
        ).to(tl.float32)  # G[cols, k]^T
        acc += tl.dot(left, right, input_precision="ieee")
    f = f_ptr + batch * stride_fb
    inside = (rows[:, None] < d) & (cols[None, :] < d)
    lower = f + rows[:, None] * stride_fr + cols[None, :] * stride_fc
    new = beta * tl.load(lower, mask=inside, other=0.0) + (1.0 - beta) * acc
    # Symmetric by construction, whatever the order of the sums in tl.dot (numpy's BLAS under
    # the interpreter, the tensor cores on a GPU): a diagonal tile's product need not be bitwise
    # symmetric, so only its lower triangle is kept and mirrored into its upper one; an
    # off-diagonal tile is stored twice, the same values as itself and transposed. The factor's
    # upper triangle is read with the tile but never kept.
    if tile_row == tile_col:
        mirrored = tl.where(rows[:, None] >= cols[None, :], new, tl.trans(new))
        tl.store(lower, mirrored, mask=inside)
    else:  # the mirror tile: F[cols, rows] = new^T
        tl.store(lower, new, mask=inside)
        tl.store(f + cols[None, :] * stride_fr + rows[:, None] * stride_fc, new, mask=inside)


def symmetric_factor_update_triton(factor: torch.Tensor, unfolded: torch.Tensor, beta: float):
    """``factor <- beta factor + (1 - beta) unfolded unfolded^T`` in place, lower triangle computed.

    Args:
        factor: ``(B, d, d)`` fp32 symmetric factors, updated in place (any strides).
        unfolded: ``(B, d, r)`` gradients unfolded along the factor's dim, fp32 or bf16.
        beta: the EMA coefficient (``shampoo_beta``).
    """
    if factor.dtype != torch.float32:
        raise ValueError(f"the symmetric factor kernel takes fp32 factors, got {factor.dtype}")
    if unfolded.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gradients must be fp32 or bf16, got {unfolded.dtype}")
    batch, d, r = unfolded.shape
    if factor.shape != (batch, d, d):
        raise ValueError(f"factor of shape {tuple(factor.shape)} for gradients {(batch, d, r)}")
    if batch == 0 or d == 0:
        return

    def grid(meta):
        tiles = triton.cdiv(d, meta["BLOCK"])
        return (tiles * (tiles + 1) // 2, batch)

    wide = needs_wide_index(factor, unfolded)
    _symmetric_factor_kernel[grid](
        factor, unfolded, d, r, *factor.stride(), *unfolded.stride(), beta, wide
    )
