"""Which implementation runs the elementwise rotated-Adam update (the ``elementwise=`` argument).

The choice torch's optimizers offer with ``foreach=`` / ``fused=``:

- ``"auto"`` (default): the Triton kernel for CUDA blocks with fp32 math when Triton is
  installed, else the torch definition.
- ``"torch"``: always the torch definition (:mod:`distsoap.kernels.rotated_adam`), the readable
  reference every other implementation is tested against.
- ``"compile"``: the torch definition through ``torch.compile`` (one graph; no recompiles when
  betas or step sizes change).
- ``"triton"``: the Triton kernel for every block; Triton must be installed (ValueError at
  construction otherwise), and a block it cannot take (fp64 math, or CPU tensors without
  ``TRITON_INTERPRET=1``) is a RuntimeError at the step, never a silent change of path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from distsoap.kernels import (
    compiled_rotated_adam_direction,
    rotated_adam_direction,
    rotated_adam_direction_torch,
    triton_available,
)

ElementwiseFn = Callable[..., torch.Tensor]
"""``(exp_avg, exp_avg_sq, grad_rotated, beta1, beta2, eps, scale) -> direction``."""

ELEMENTWISE = ("auto", "torch", "compile", "triton")


def rotated_adam_direction_triton_only(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """The Triton kernel, or a RuntimeError saying why it cannot take these tensors."""
    if grad_rotated.dtype != torch.float32 or exp_avg.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError(
            "elementwise='triton' runs fp32 math with fp32 or bf16 moments; this block has "
            f"{grad_rotated.dtype} math and {exp_avg.dtype} moments (fp64 parameters): use "
            "elementwise='auto' or 'torch'"
        )
    if not grad_rotated.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"elementwise='triton' needs CUDA tensors (this block is on {grad_rotated.device}), "
            "or TRITON_INTERPRET=1 to run the kernel in Triton's interpreter"
        )
    from distsoap.kernels.rotated_adam_triton import rotated_adam_direction_triton

    return rotated_adam_direction_triton(
        exp_avg, exp_avg_sq, grad_rotated, beta1, beta2, eps, scale
    )


def choose_elementwise(name: str) -> ElementwiseFn:
    """The implementation called ``name`` (see the module docstring).

    Raises:
        ValueError: an unknown name, or ``"triton"`` without Triton installed.
    """
    if name not in ELEMENTWISE:
        raise ValueError(f"elementwise must be one of {ELEMENTWISE}, got {name!r}")
    if name == "triton" and not triton_available():
        raise ValueError(
            "elementwise='triton' needs Triton installed (pip install 'distsoap[triton]'); "
            "use elementwise='auto' to take it only where it is available"
        )
    return {
        "auto": rotated_adam_direction,
        "torch": rotated_adam_direction_torch,
        "compile": compiled_rotated_adam_direction,
        "triton": rotated_adam_direction_triton_only,
    }[name]
