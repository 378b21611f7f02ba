"""The rotated Adam update: SOAP's elementwise part (shared/SOAP.md steps 3-5 and the step size).

Works on a whole bucket at once: moments and rotated gradients are stacks ``(B, ...)`` of
same-shape blocks, and each block may carry its own step size (blocks of one bucket can have
seen different numbers of updates).
"""

from __future__ import annotations

import torch


def rotated_adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Update the moments in place and return ``scale * M / (sqrt(V) + eps)``.

    ``M <- beta1 M + (1 - beta1) G'``, ``V <- beta2 V + (1 - beta2) G'^2``. Moments stored in a
    lower precision than the gradient are updated in the gradient's precision and written back.

    Args:
        exp_avg: first moments ``(B, ...)``, updated in place.
        exp_avg_sq: second moments ``(B, ...)``, updated in place.
        grad_rotated: the gradients in the eigenbasis ``(B, ...)`` (fp32 or fp64).
        beta1: first-moment EMA coefficient.
        beta2: second-moment EMA coefficient.
        eps: added to ``sqrt(V)``.
        scale: a float, or one factor per block of shape ``(B,)``, multiplied into the result.

    Returns:
        The scaled Adam direction, in ``grad_rotated``'s dtype.

    """
    compute = grad_rotated.dtype
    m = exp_avg if exp_avg.dtype == compute else exp_avg.to(compute)
    v = exp_avg_sq if exp_avg_sq.dtype == compute else exp_avg_sq.to(compute)
    m.mul_(beta1).add_(grad_rotated, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad_rotated, grad_rotated, value=1.0 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    direction = m / (v.sqrt().add_(eps))
    if isinstance(scale, torch.Tensor):
        return direction.mul_(scale.view(-1, *[1] * (direction.dim() - 1)))
    return direction.mul_(scale)
