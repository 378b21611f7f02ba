"""Eigenbases of the Kronecker factors: the first full eigendecomposition and the QR refresh.

Both work on stacks of same-size factors ``(B, d, d)``; nothing here communicates.

Failures are contained per block: a decomposition that raises or returns non-finite values is
retried in fp64, then in fp64 with a growing diagonal jitter (relative to the factor's mean
diagonal); if every attempt fails the block keeps its previous basis and is reported as failed,
so the caller can count consecutive failures. A factor that is all zero or not finite never
produces a basis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Added to the diagonal before the first eigendecomposition, as the reference does. It only matters
# for an all-zero factor; for any real factor it is far below one ulp of the diagonal.
EIGH_DIAGONAL_SHIFT = 1e-30
# Diagonal jitter of the last-resort retries, relative to the factor's mean diagonal.
JITTER = (1e-6, 1e-4, 1e-2)


def _eigh_descending(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric matrices, columns ordered by descending eigenvalue."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    _, vectors = torch.linalg.eigh(matrix + EIGH_DIAGONAL_SHIFT * eye)
    return vectors.flip(-1)


def _usable(factor: torch.Tensor) -> bool:
    return bool(torch.isfinite(factor).all()) and bool(factor.abs().amax() > 0)


def _jittered(factor: torch.Tensor, jitter: float) -> torch.Tensor:
    scale = factor.diagonal().abs().mean().clamp_min(torch.finfo(factor.dtype).tiny)
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return factor + jitter * scale * eye


def nonfinite_rows(stack: torch.Tensor) -> list[int]:
    """The rows of a ``(B, d, d)`` stack of bases holding a NaN or an Inf, in one reduction.

    A row's sum is non-finite exactly when one of its entries is, as long as finite entries
    cannot overflow it: bases have entries of at most 1 in magnitude (orthonormal columns), so
    ``d^2`` of them sum far below the dtype's range. A garbage row large enough to overflow is
    reported too; it then takes the retries, whose result is checked entry by entry.
    """
    return (~torch.isfinite(stack.sum(dim=(1, 2)))).nonzero().flatten().tolist()


def _first_success(attempts) -> torch.Tensor | None:
    """The first attempt that neither raises nor returns non-finite values."""
    for attempt in attempts:
        try:
            result = attempt()
        except (torch.linalg.LinAlgError, RuntimeError):
            continue
        if bool(torch.isfinite(result).all()):
            return result
    return None


def _robust_eigh(factor: torch.Tensor) -> torch.Tensor | None:
    """Eigenbasis of one factor: fp32 (its dtype), fp64, fp64 with growing jitter; or None."""
    if not _usable(factor):
        return None
    wide = factor.to(torch.float64)
    attempts = [lambda: _eigh_descending(factor), lambda: _eigh_descending(wide)]
    attempts += [lambda j=j: _eigh_descending(_jittered(wide, j)) for j in JITTER]
    result = _first_success(attempts)
    return None if result is None else result.to(factor.dtype)


def initial_basis(factor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Eigenbases of a stack of factors from a full symmetric eigendecomposition.

    Computed in the factor's dtype (fp32 normally), as the reference does; rows whose
    decomposition fails are retried one by one (see the module docstring).

    Args:
        factor: ``(B, d, d)`` symmetric positive semi-definite matrices.

    Returns:
        ``(B, d, d)`` orthogonal matrices, eigenvectors in columns by descending eigenvalue
        (identity for failed rows), and the failed row indices.
    """
    try:
        bases = _eigh_descending(factor)
        bad = nonfinite_rows(bases)
    except (torch.linalg.LinAlgError, RuntimeError):
        bases = torch.empty_like(factor)
        bad = list(range(factor.shape[0]))
    failed = []
    for row in bad:
        basis = _robust_eigh(factor[row])
        if basis is None:
            failed.append(row)
            basis = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
        bases[row] = basis
    return bases, failed


def q_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of square matrices, without forming R.

    The same LAPACK (or cuSOLVER) routines ``torch.linalg.qr`` runs, Householder reflections
    then their product, so the same Q; skipping R saves the copy of its triangle (about a tenth
    of a refresh's QR time on the CPU benchmark set).
    """
    reflections, tau = torch.geqrf(matrix)
    return torch.linalg.householder_product(reflections, tau)


def _robust_qr(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor | None:
    """Q of ``qr(GG Q)`` for one block: fp32, fp64, fp64 with jittered GG; or None."""
    if not _usable(factor):
        return None
    wide, wide_basis = factor.to(torch.float64), basis.to(torch.float64)
    attempts = [
        lambda: q_factor(factor @ basis),
        lambda: q_factor(wide @ wide_basis),
    ]
    attempts += [lambda j=j: q_factor(_jittered(wide, j) @ wide_basis) for j in JITTER]
    result = _first_success(attempts)
    return None if result is None else result.to(factor.dtype)


def _batched_qr(power: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Batched QR; the rows that raised or came out non-finite."""
    try:
        q = q_factor(power)
    except (torch.linalg.LinAlgError, RuntimeError):
        return torch.empty_like(power), list(range(power.shape[0]))
    bad = nonfinite_rows(q)
    return q, bad


def basis_products(
    factors: Sequence[torch.Tensor | None], bases: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """``GG Q`` for every factored dim (None elsewhere): the refresh's one product per dim."""
    return [
        None if f is None or b is None else torch.bmm(f, b)
        for f, b in zip(factors, bases, strict=True)
    ]


def refresh_bases(
    factors: Sequence[torch.Tensor | None],
    bases: Sequence[torch.Tensor | None],
    exp_avg_sq: torch.Tensor,
    products: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor, set[int]]:
    """One power-iteration step with QR for every factored dim (docs/algorithm.md, "Refresh").

    For each factored dim i, in order: estimate eigenvalues ``e = diag(Q^T GG Q)``, sort them in
    descending order, permute the second moment along dim i and the columns of Q by that order,
    then ``Q <- qr(GG Q)``. The product ``GG Q`` computed for the estimate is reused for the power
    step (permuting its columns equals multiplying by the permuted Q). A block whose QR fails
    every retry keeps its basis for that dim, and its second moment is not permuted along it.

    Args:
        factors: per block dim, ``(B, d_i, d_i)`` or None.
        bases: per block dim, the current ``(B, d_i, d_i)`` bases or None.
        exp_avg_sq: second moments ``(B, d_1, ..., d_k)`` in the current eigenbasis.
        products: :func:`basis_products` of these factors and bases when the caller has them
            already (the adaptive refresh's test reads them first), else computed here.

    Returns:
        The new bases (None where not factored), the permuted second moments, and the rows for
        which some dim kept its old basis.
    """
    new_bases: list[torch.Tensor | None] = []
    batch = exp_avg_sq.shape[0]
    failed: set[int] = set()
    if products is None:
        products = basis_products(factors, bases)
    for dim, (factor, basis) in enumerate(zip(factors, bases, strict=True)):
        product = products[dim]  # GG Q
        if factor is None or basis is None or product is None:
            new_bases.append(None)
            continue
        estimated = (basis * product).sum(dim=1)  # diag(Q^T GG Q), shape (B, d)
        order = torch.argsort(estimated, dim=-1, descending=True)
        power = product.gather(2, order.unsqueeze(1).expand_as(product))
        q, bad = _batched_qr(power)
        for row in bad:
            sorted_basis = basis[row][:, order[row]]
            retried = _robust_qr(factor[row], sorted_basis)
            if retried is None:  # keep this block's basis and leave its moments unpermuted
                failed.add(row)
                retried = basis[row]
                order[row] = torch.arange(order.shape[-1], device=order.device)
            q[row] = retried
        view = [batch] + [1] * (exp_avg_sq.dim() - 1)
        view[1 + dim] = order.shape[-1]
        exp_avg_sq = exp_avg_sq.gather(1 + dim, order.view(view).expand_as(exp_avg_sq))
        new_bases.append(q)
    return new_bases, exp_avg_sq, failed
