"""Padded blocks (``block_size``): the padding is kept out of every eigenbasis.

A dim cut into ``k`` blocks of equal size ``b`` is zero-padded at its end to ``k * b``, so all
blocks of a parameter share one shape and stack into one bucket. A padded block's gradient is
zero on the padding, so its factors are too: ``GG = [[A, 0], [0, 0]]`` with ``A`` the factor
of its real part. An eigendecomposition of that matrix may mix the padding's directions with
directions of ``A``'s own null space (both have eigenvalue 0), and a later gradient entering
that null space would then be rotated partly into the padding and lost: the block would no
longer be SOAP on its real part.

So wherever a basis is computed (the first eigendecomposition, the refresh's power step and
its eigenvalue estimate) the padding's diagonal entries of the factor read -1 instead of 0.
Their eigenvalue is then below every real one (factors are positive semi-definite), so the
padding's directions stay exactly the padding coordinates, sorted last, and ``A``'s own
eigenvectors are those of ``A`` alone. Stored factors keep the zeros; only the copy handed to
the decomposition is shifted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PADDING_EIGENVALUE = -1.0
"""What the padding's diagonal entries read in a decomposition: below any real eigenvalue."""


def shifted_for_padding(
    factors: Sequence[torch.Tensor | None], padding: Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor | None]:
    """Factors whose padding diagonal reads :data:`PADDING_EIGENVALUE` (new tensors there).

    Args:
        factors: per block dim, ``(B, d, d)`` factors or None.
        padding: per block dim, ``(B, d)`` bool masks of the padding, or None (no padding).
    """
    if padding is None:
        return list(factors)
    shifted = []
    for factor, mask in zip(factors, padding, strict=True):
        if factor is None or mask is None or not bool(mask.any()):
            shifted.append(factor)
            continue
        diagonal = mask.to(factor.dtype) * PADDING_EIGENVALUE
        shifted.append(factor + torch.diag_embed(diagonal))
    return shifted
