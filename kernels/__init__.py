"""Elementwise kernels of distsoap, installed as ``distsoap.kernels``.

Each op family has a torch implementation, the definition of correct and the fallback, and a
Triton one used for CUDA tensors when Triton is installed:

- rotated Adam (:mod:`.rotated_adam` in torch, :mod:`.rotated_adam_triton`).

:mod:`.symmetric_factor_triton` holds a factor update that computes one triangle of
``G G^T``; its torch definition is ``baddbmm`` in :mod:`distsoap.math.rotations`. It is tested
but not used by the optimizer until a GPU measurement shows it faster than cuBLAS.

The optimizer's ``elementwise=`` argument picks among them (:mod:`distsoap.engine.elementwise`):
``"torch"`` forces the torch versions.
"""

from __future__ import annotations

import torch

from .rotated_adam import compiled_rotated_adam_direction
from .rotated_adam import rotated_adam_direction as rotated_adam_direction_torch

__all__ = [
    "compiled_rotated_adam_direction",
    "rotated_adam_direction",
    "rotated_adam_direction_torch",
    "triton_available",
]


def triton_available() -> bool:
    """Whether Triton is installed (its kernels then run on CUDA, or in its interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def rotated_adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Rotated Adam over a bucket: Triton on CUDA for fp32 math, else the torch definition."""
    if (
        grad_rotated.is_cuda
        and grad_rotated.dtype == torch.float32
        and exp_avg.dtype in (torch.float32, torch.bfloat16)
        and triton_available()
    ):
        from .rotated_adam_triton import rotated_adam_direction_triton

        return rotated_adam_direction_triton(
            exp_avg, exp_avg_sq, grad_rotated, beta1, beta2, eps, scale
        )
    return rotated_adam_direction_torch(exp_avg, exp_avg_sq, grad_rotated, beta1, beta2, eps, scale)
