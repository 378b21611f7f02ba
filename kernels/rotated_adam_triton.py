"""The rotated Adam update as one Triton kernel over a whole bucket.

Same contract as :func:`distsoap.kernels.rotated_adam.rotated_adam_direction` (the torch
definition of correct): moments updated in place, ``scale * M / (sqrt(V) + eps)`` returned.
fp32 math; moments stored in fp32 or bf16; one launch for all blocks of a bucket, each block's
scale (its step size) read by row. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``
(set before this module is imported), which the tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# A launch addresses elements with int32 offsets unless told otherwise; the masked tail of the
# last program reaches up to one BLOCK (65536 at most, the interpreter's) past the end, and must
# not wrap either.
INT32_SAFE_ELEMENTS = 2**31 - 1 - 65536


def needs_wide_index(n_elements: int) -> bool:
    """Whether a bucket of ``n_elements`` needs int64 offsets (int32 ones would wrap around)."""
    return n_elements > INT32_SAFE_ELEMENTS


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # one large block keeps the interpreter fast
        return [triton.Config({"BLOCK": 65536}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))
    ]


@triton.autotune(configs=_configs(), key=["n_elements"], restore_value=["m_ptr", "v_ptr"])
@triton.jit
def _rotated_adam_kernel(
    m_ptr,
    v_ptr,
    g_ptr,
    out_ptr,
    scale_ptr,
    n_elements,
    row_size,
    beta1,
    beta2,
    eps,
    WIDE_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    if WIDE_INDEX:  # 2^31 elements or more: int32 offsets would wrap to negative addresses
        block = block.to(tl.int64)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * (g * g)
    scale = tl.load(scale_ptr + offsets // row_size, mask=mask, other=0.0)
    direction = scale * (m / (tl.sqrt(v) + eps))
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offsets, direction, mask=mask)


SUPPORTED_MOMENTS = (torch.float32, torch.bfloat16)


def rotated_adam_direction_triton(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Triton version of ``rotated_adam_direction`` (fp32 gradients, fp32 / bf16 moments).

    Non-contiguous inputs are copied to contiguous buffers and the moments written back.
    """
    if grad_rotated.dtype != torch.float32:
        raise ValueError(f"the Triton kernel takes fp32 gradients, got {grad_rotated.dtype}")
    if exp_avg.dtype not in SUPPORTED_MOMENTS or exp_avg_sq.dtype not in SUPPORTED_MOMENTS:
        raise ValueError(f"moments must be one of {SUPPORTED_MOMENTS}")
    batch = grad_rotated.shape[0]
    n = grad_rotated.numel()
    row = max(n // max(batch, 1), 1)
    g = grad_rotated.contiguous()
    m = exp_avg.contiguous()
    v = exp_avg_sq.contiguous()
    if isinstance(scale, torch.Tensor):
        scales = scale.to(device=g.device, dtype=torch.float32).contiguous()
    else:
        scales = torch.full((max(batch, 1),), float(scale), dtype=torch.float32, device=g.device)
    out = torch.empty_like(g)
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        wide = needs_wide_index(n)
        _rotated_adam_kernel[grid](m, v, g, out, scales, n, row, beta1, beta2, eps, wide)
    if m.data_ptr() != exp_avg.data_ptr():
        exp_avg.copy_(m)
    if v.data_ptr() != exp_avg_sq.data_ptr():
        exp_avg_sq.copy_(v)
    return out
