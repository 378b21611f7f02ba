"""Eigenbases of the Kronecker factors: the first full eigendecomposition and the QR refresh.

Both work on stacks of same-size factors ``(B, d, d)``; nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Added to the diagonal before the first eigendecomposition, as the reference does. It only matters
# for an all-zero factor; for any real factor it is far below one ulp of the diagonal.
EIGH_DIAGONAL_SHIFT = 1e-30


def _eigh_descending(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric matrices, columns ordered by descending eigenvalue."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    _, vectors = torch.linalg.eigh(matrix + EIGH_DIAGONAL_SHIFT * eye)
    return vectors.flip(-1)


def initial_basis(factor: torch.Tensor) -> torch.Tensor:
    """Eigenbasis of a stack of factors from a full symmetric eigendecomposition.

    Computed in the factor's dtype (fp32 normally); if LAPACK fails to converge, the failing
    stack is retried in fp64 and cast back, as the reference implementation does.

    Args:
        factor: ``(B, d, d)`` symmetric positive semi-definite matrices.

    Returns:
        ``(B, d, d)`` orthogonal matrices, eigenvectors in columns by descending eigenvalue.

    """
    try:
        return _eigh_descending(factor)
    except torch.linalg.LinAlgError:
        return _eigh_descending(factor.to(torch.float64)).to(factor.dtype)


def refresh_bases(
    factors: Sequence[torch.Tensor | None],
    bases: Sequence[torch.Tensor | None],
    exp_avg_sq: torch.Tensor,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """One power-iteration step with QR for every factored dim (shared/SOAP.md, "Refresh").

    For each factored dim i, in order: estimate eigenvalues ``e = diag(Q^T GG Q)``, sort them in
    descending order, permute the second moment along dim i and the columns of Q by that order,
    then ``Q <- qr(GG Q)``. The product ``GG Q`` computed for the estimate is reused for the power
    step (permuting its columns equals multiplying by the permuted Q).

    Args:
        factors: per block dim, ``(B, d_i, d_i)`` or None.
        bases: per block dim, the current ``(B, d_i, d_i)`` bases or None.
        exp_avg_sq: second moments ``(B, d_1, ..., d_k)`` in the current eigenbasis.

    Returns:
        The new bases (None where not factored) and the permuted second moments.

    """
    new_bases: list[torch.Tensor | None] = []
    batch = exp_avg_sq.shape[0]
    for dim, (factor, basis) in enumerate(zip(factors, bases, strict=True)):
        if factor is None or basis is None:
            new_bases.append(None)
            continue
        product = torch.bmm(factor, basis)  # GG Q
        estimated = (basis * product).sum(dim=1)  # diag(Q^T GG Q), shape (B, d)
        order = torch.argsort(estimated, dim=-1, descending=True)
        view = [batch] + [1] * (exp_avg_sq.dim() - 1)
        view[1 + dim] = order.shape[-1]
        exp_avg_sq = exp_avg_sq.gather(1 + dim, order.view(view).expand_as(exp_avg_sq))
        power = product.gather(2, order.unsqueeze(1).expand_as(product))
        q, _ = torch.linalg.qr(power)
        new_bases.append(q)
    return new_bases, exp_avg_sq
