"""Batched rotations and Kronecker-factor products on a bucket of same-shape blocks.

Every function takes a stack ``x`` of shape ``(B, d_1, ..., d_k)`` (B blocks of one shape) and,
per block dim, either a stack of square matrices ``(B, d_i, d_i)`` or ``None`` (dim not factored).
All work is batched matmuls; nothing here communicates.

Rotating *in* contracts dim i with Q_i (``x -> Q_i^T x`` along i); rotating *out* uses Q_i
(``x -> Q_i x`` along i). For a matrix: ``in(G) = Q_L^T G Q_R`` and ``out(X) = Q_L X Q_R^T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Bases = Sequence[torch.Tensor | None]


def _contract_every_dim(x: torch.Tensor, bases: Bases, transpose_basis: bool) -> torch.Tensor:
    """Contract each block dim in turn with its basis, cycling that dim to the end.

    After all k dims have been visited the dims are back in their original order, so no final
    permutation is needed. For a matrix this is two bmm calls and no copies.
    """
    batch = x.shape[0]
    if x.dim() - 1 != len(bases):
        raise ValueError(f"stack of rank {x.dim() - 1} given {len(bases)} bases")
    for basis in bases:
        if basis is None:
            x = x.movedim(1, -1)
            continue
        dim = x.shape[1]
        rest = x.shape[2:]
        rows = x.reshape(batch, dim, -1).mT  # (B, R, d): each row is one fibre along this dim
        rotated = torch.bmm(rows, basis.mT if transpose_basis else basis)
        x = rotated.reshape(batch, *rest, dim)
    return x


def rotate_in(x: torch.Tensor, bases: Bases) -> torch.Tensor:
    """Express a stack of blocks in the eigenbases: ``x -> Q_i^T x`` along every factored dim."""
    return _contract_every_dim(x, bases, transpose_basis=False)


def rotate_out(x: torch.Tensor, bases: Bases) -> torch.Tensor:
    """Bring a stack of blocks back from the eigenbases: ``x -> Q_i x`` along every factored dim."""
    return _contract_every_dim(x, bases, transpose_basis=True)


def unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Matricise a stack along one block dim: ``(B, d_1..d_k) -> (B, d_dim, prod(others))``."""
    batch = x.shape[0]
    return x.movedim(1 + dim, 1).reshape(batch, x.shape[1 + dim], -1)


def update_factors(
    factors: Sequence[torch.Tensor | None], grad: torch.Tensor, shampoo_beta: float
) -> None:
    """EMA of the Kronecker factors in place: ``GG_i <- beta GG_i + (1 - beta) G_(i) G_(i)^T``.

    ``G_(i)`` is the stack of gradients unfolded along dim i, so the product contracts the
    gradient with itself over every other dim (for a matrix: ``G G^T`` and ``G^T G``).

    Args:
        factors: per block dim, a ``(B, d_i, d_i)`` stack updated in place, or None.
        grad: the gradient stack ``(B, d_1, ..., d_k)`` in the factors' dtype.
        shampoo_beta: the EMA factor.

    """
    for dim, factor in enumerate(factors):
        if factor is None:
            continue
        unfolded = unfold(grad, dim)
        factor.baddbmm_(unfolded, unfolded.mT, beta=shampoo_beta, alpha=1.0 - shampoo_beta)
