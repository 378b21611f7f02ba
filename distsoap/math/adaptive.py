"""How well a basis still diagonalises its factor: the test of the adaptive refresh.

A due refresh may be skipped while the current eigenbasis ``Q`` of every factored dim still
(nearly) diagonalises its factor ``GG``: the *relative off-diagonal mass*

    off(GG, Q) = ||Q^T GG Q - diag(Q^T GG Q)||_F^2 / ||Q^T GG Q||_F^2

is 0 when ``Q`` holds exact eigenvectors of ``GG`` and grows as the factor drifts away from the
basis. A block's figure is the largest over its factored dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def off_diagonal_mass(
    factors: Sequence[torch.Tensor | None],
    bases: Sequence[torch.Tensor | None],
    compute: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """The largest relative off-diagonal mass over the factored dims, per row.

    Args:
        factors: per block dim, ``(B, d, d)`` factors or None.
        bases: per block dim, ``(B, d, d)`` bases or None.
        compute: the dtype of the math (factors and bases stored lower are widened to it).

    Returns:
        ``(B,)`` figures in [0, 1] (NaN where a factor is not finite), or None when no dim is
        factored.
    """
    worst = None
    for factor, basis in zip(factors, bases, strict=True):
        if factor is None or basis is None:
            continue
        factor, basis = factor.to(compute), basis.to(compute)
        rotated = basis.mT @ torch.bmm(factor, basis)
        total = rotated.square().sum(dim=(1, 2))
        diagonal = rotated.diagonal(dim1=1, dim2=2).square().sum(dim=1)
        mass = (total - diagonal).clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
        worst = mass if worst is None else torch.maximum(worst, mass)
    return worst
