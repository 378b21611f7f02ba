"""The rotated Adam update: SOAP's elementwise part (docs/algorithm.md steps 3-5 and the step size).

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


def rotated_adam_direction_compilable(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    eps: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``rotated_adam_direction`` with every scalar a 0-d tensor and ``scale`` a ``(B,)`` tensor.

    Written for ``torch.compile(fullgraph=True, dynamic=True)``: no Python numbers in the
    graph, so changing betas (OneCycleLR) or step sizes never recompiles, and shapes are
    symbolic, so one graph serves every bucket of a rank. fp32 moments only.
    """
    exp_avg.mul_(beta1).add_(grad_rotated * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad_rotated * grad_rotated * (1.0 - beta2))
    direction = exp_avg / (exp_avg_sq.sqrt() + eps)
    return direction * scale.reshape([-1] + [1] * (direction.dim() - 1))


_COMPILED = None


def compiled_rotated_adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_rotated: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """The torch.compile'd elementwise update (same contract as ``rotated_adam_direction``).

    Moments stored in another dtype than the gradient take the eager path.
    """
    global _COMPILED
    if exp_avg.dtype != grad_rotated.dtype or exp_avg_sq.dtype != grad_rotated.dtype:
        return rotated_adam_direction(exp_avg, exp_avg_sq, grad_rotated, beta1, beta2, eps, scale)
    if _COMPILED is None:
        _COMPILED = torch.compile(rotated_adam_direction_compilable, fullgraph=True, dynamic=True)
    like = grad_rotated
    batch = like.shape[0]
    scales = (
        scale.to(like.dtype)
        if isinstance(scale, torch.Tensor)
        else torch.full((batch,), float(scale), dtype=like.dtype, device=like.device)
    )

    def scalar(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=like.dtype, device=like.device)

    return _COMPILED(
        exp_avg, exp_avg_sq, grad_rotated, scalar(beta1), scalar(beta2), scalar(eps), scales
    )
