"""Storage dtypes of SOAP's state: kept low, computed in fp32.

``moment_dtype``, ``factor_dtype`` and ``basis_dtype`` choose how a block's moments, Kronecker
factors and eigenbases are *stored*; the math always runs in the compute dtype (fp32, fp64 for
fp64 parameters, whose state is fp64 throughout). A low-precision factor or basis is widened
once where a step reads it and rounded once where the step writes it.

A basis stored in bf16 is orthonormal only to bf16's precision: rounding an orthonormal matrix
leaves ``||Q^T Q - I||_F / sqrt(d)`` near 0.0024 at any size (measured for d from 8 to 2048).
The drift guard bounds that loss on every new basis as it will be stored; past
``basis_orthogonality_tol`` the block keeps its bases in fp32 from then on (counted in its
``basis_fallbacks`` state and logged), so a compressed basis never rotates worse than the
tolerance allows.

The bound costs ``O(d^2)`` where the loss itself costs a ``d x d`` product (as much as the
refresh's own ``GG Q``): with ``Q`` the new basis (orthonormal to the compute dtype's precision)
and ``E`` what rounding adds to it, ``Q~^T Q~ - I = Q^T E + E^T Q + E^T E``, so

    ||Q~^T Q~ - I||_F <= 2 ||E||_F + ||E||_F^2

(:func:`orthogonality_loss_bound`). Rounding errors are nearly independent, so the bound reads
about sqrt(2) times the loss (0.0034 for bf16): the guard acts once the loss passes about 0.7x
the tolerance. :func:`orthogonality_loss` is the loss itself, the reference the tests hold the
bound against.

Computing ``E`` still takes four passes over every new basis (round, widen, subtract, norm).
Rounding to nearest moves each entry by at most ``u |q|`` (``u``: the storage dtype's unit
roundoff, 2^-8 for bf16), or by half a subnormal step below the normal range, so
``||E||_F <= u ||Q||_F + d * (half a subnormal step)`` for any ``Q``, and the bound above is
monotone in ``||E||_F``. :func:`orthogonality_loss_ceiling` evaluates it from ``||Q||_F`` alone
(one read pass); :func:`drifting_rows` computes the exact bound only for the rows whose ceiling
exceeds the tolerance. For bf16 the ceiling is about ``2u = 0.0078`` (0.0080 at d = 128,
0.0088 at d = 4096), below the default tolerance of 0.01, so at the default the guard costs one
pass; the verdict is the exact bound's in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What factors and bases may be stored in (fp64 parameters always keep fp64)."""


@dataclass(frozen=True)
class StorageDtypes:
    """The dtypes one block's state is stored in."""

    moments: torch.dtype
    """``exp_avg`` and ``exp_avg_sq``."""
    factors: torch.dtype
    """The Kronecker factors ``factor_i``."""
    bases: torch.dtype
    """The eigenbases ``basis_i``."""


def widened(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype) -> list:
    """The tensors in ``dtype`` (the same tensor when already in it)."""
    return [None if t is None else t.to(dtype) for t in tensors]


def store_back(stored: Sequence[torch.Tensor | None], computed: Sequence) -> None:
    """Round computed values into their storage (nothing to do where they are the storage)."""
    for target, value in zip(stored, computed, strict=True):
        if target is not None and value is not target:
            target.copy_(value)


def orthogonality_loss(bases: torch.Tensor) -> torch.Tensor:
    """``||Q^T Q - I||_F / sqrt(d)`` for each basis of a ``(B, d, d)`` stack, shape ``(B,)``."""
    d = bases.shape[-1]
    eye = torch.eye(d, dtype=bases.dtype, device=bases.device)
    return (bases.mT @ bases - eye).flatten(1).norm(dim=1) / d**0.5


def orthogonality_loss_bound(computed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An upper bound of :func:`orthogonality_loss` of ``computed`` rounded to ``dtype``.

    Args:
        computed: ``(B, d, d)`` orthonormal bases in the compute dtype.
        dtype: the dtype they are stored in.

    Returns:
        ``(2 ||E||_F + ||E||_F^2) / sqrt(d)`` per basis, ``E`` the rounding error, shape
        ``(B,)``: at least the loss of the stored basis, up to the compute dtype's own
        (about 1e-6 in fp32).
    """
    error = torch.linalg.vector_norm(computed.to(dtype).to(computed.dtype) - computed, dim=(1, 2))
    return (2 * error + error.square()) / computed.shape[-1] ** 0.5


CEILING_MARGIN = 1e-3
"""Relative room a ceiling must leave below the tolerance to settle a row without the exact
bound: far above the few ulps by which floating-point sums can miss the exact inequality."""


def orthogonality_loss_ceiling(computed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An upper bound of :func:`orthogonality_loss_bound` from ``||Q||_F`` alone (one pass).

    Args:
        computed: ``(B, d, d)`` bases in the compute dtype (any values).
        dtype: the dtype they are stored in.

    Returns:
        ``(2 e + e^2) / sqrt(d)`` per basis with ``e = u ||Q||_F + d * tiny * eps / 2``, shape
        ``(B,)`` (NaN for a non-finite basis).
    """
    info = torch.finfo(dtype)
    d = computed.shape[-1]
    unit_roundoff = info.eps / 2  # round to nearest
    subnormal = info.tiny * info.eps / 2  # half the spacing below the normal range
    # no flatten: the new bases come column-major from the QR, and flattening them copies
    error = unit_roundoff * torch.linalg.vector_norm(computed, dim=(1, 2)) + d * subnormal
    return (2 * error + error.square()) / d**0.5


def drifting_rows(
    new_bases: Sequence[torch.Tensor | None], stored: Sequence[torch.dtype | None], tol: float
) -> list[int]:
    """Rows whose new bases, once rounded to their storage dtype, lose more than ``tol``.

    Args:
        new_bases: per block dim, the new ``(B, d, d)`` bases in the compute dtype, or None.
        stored: per block dim, the dtype the basis is stored in, or None.
        tol: the largest orthogonality loss allowed (:func:`orthogonality_loss`), compared
            with its bound (:func:`orthogonality_loss_bound`).
    """
    drifting: set[int] = set()
    for basis, dtype in zip(new_bases, stored, strict=True):
        if basis is None or dtype is None or dtype == basis.dtype:
            continue
        ceiling = orthogonality_loss_ceiling(basis, dtype)
        # rows the ceiling cannot settle (NaN included) get the exact bound
        unsettled = (~(ceiling * (1 + CEILING_MARGIN) <= tol)).nonzero().flatten()
        if unsettled.numel() == 0:
            continue
        loss = orthogonality_loss_bound(basis.index_select(0, unsettled), dtype)
        rows = unsettled[~(loss <= tol)].tolist()  # NaN counts as drifting
        drifting.update(rows)
    return sorted(drifting)
