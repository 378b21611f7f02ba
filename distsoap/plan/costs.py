"""What one block holds and what refreshing its eigenbases costs.

State bytes are exact: they follow :func:`distsoap.engine.update.new_block_tensors`, the tensors
a block really allocates. ``exp_avg`` and ``exp_avg_sq`` have the block's elements; every
factored dim of size d has, per matrix of the block (``rows`` of them for an expert stack), a
d x d factor and a d x d basis.

Refresh FLOPs are a model of :func:`distsoap.math.bases.refresh_bases`. Per factored dim of size
d and per matrix, one refresh costs

- ``2 d^3`` for the product ``GG Q`` (d x d by d x d; the eigenvalue estimate reuses it, and its
  ``2 d^2`` is left out), and
- ``(8/3) d^3`` for the QR of that product: Householder factorisation ``(4/3) d^3`` plus forming
  Q explicitly ``(4/3) d^3``,

so ``(14/3) d^3`` in all. Each block refreshes once every ``precondition_frequency`` steps, so
the per-step figure divides by it. Under the default ``"aligned"`` schedule every block
refreshes on the same step: that step carries ``precondition_frequency`` times the per-step
figure, and the others none. Rotations, factor updates and the elementwise Adam (every step,
``O(numel * d)``) are not included; nor are retries of a failed QR.

The adaptive refresh (``refresh_tolerance`` > 0) reads its test from the same ``GG Q`` product, so
a refresh costs no more with it, and a skipped one costs that product alone. How many are
skipped depends on the gradients, but ``max_skipped_refreshes`` = m bounds it: of m + 1
consecutive due refreshes of a block at least one runs. Per factored dim the cost per due step
therefore lies between ``(2 + (8/3) / (m + 1)) d^3`` (every allowed skip taken) and
``(14/3) d^3`` (none): :attr:`BlockState.refresh_flops_fewest` and
:attr:`BlockState.refresh_flops`. The same holds for the pieces of a parameter whose blocks have
several owners: their owners measure the masses before agreeing on a skip, and the refresh then
reuses those products.

Bases stored below fp32 (``basis_dtype``) that the drift guard moves back to fp32
(``basis_orthogonality_tol``) grow at run time; the planned bytes assume no such fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from distsoap.engine.blocks import BlockSpec

PRODUCT_FLOPS = 2.0
"""FLOPs of ``GG Q`` per d^3."""
QR_FLOPS = 8.0 / 3.0
"""FLOPs of a Householder QR with Q formed, per d^3."""


@dataclass(frozen=True)
class BlockState:
    """The SOAP state of one block and the cost of refreshing it."""

    moments: int
    """Bytes of ``exp_avg`` and ``exp_avg_sq`` together."""
    factors: int
    """Bytes of the Kronecker factors."""
    bases: int
    """Bytes of the eigenbases."""
    refresh_flops: float
    """FLOPs of refreshing the block's bases, per step (one refresh per precondition_frequency)."""
    refresh_flops_fewest: float = 0.0
    """The fewest FLOPs per step the adaptive refresh can bring that to (every skip it may take
    taken); ``refresh_flops`` without the adaptive refresh."""

    @property
    def total(self) -> int:
        """Bytes of all the block's state."""
        return self.moments + self.factors + self.bases

    def __add__(self, other: BlockState) -> BlockState:
        """The state of two blocks together."""
        return BlockState(
            self.moments + other.moments,
            self.factors + other.factors,
            self.bases + other.bases,
            self.refresh_flops + other.refresh_flops,
            self.refresh_flops_fewest + other.refresh_flops_fewest,
        )

    def times(self, copies: int) -> BlockState:
        """The state of ``copies`` copies of this block."""
        return BlockState(
            copies * self.moments,
            copies * self.factors,
            copies * self.bases,
            copies * self.refresh_flops,
            copies * self.refresh_flops_fewest,
        )


NO_STATE = BlockState(0, 0, 0, 0.0, 0.0)
"""A block that holds nothing here (another rank owns it, or it has no elements)."""


def refresh_flops(
    spec: BlockSpec,
    precondition_frequency: int,
    max_skipped_refreshes: int | None = None,
) -> tuple[float, float]:
    """Modelled FLOPs per step of the block's eigenbasis refreshes (see the module docstring).

    Args:
        spec: the block's layout.
        precondition_frequency: refresh interval of the bases.
        max_skipped_refreshes: the adaptive refresh's bound on consecutive skips; None
            without the adaptive refresh.

    Returns:
        The FLOPs per step with no refresh skipped, and with every skip allowed taken.
    """
    cubes = spec.rows * sum(d**3 for d in spec.factor_dims) / precondition_frequency
    most = (PRODUCT_FLOPS + QR_FLOPS) * cubes
    if max_skipped_refreshes is None:
        return most, most
    return most, (PRODUCT_FLOPS + QR_FLOPS / (max_skipped_refreshes + 1)) * cubes


def block_state(
    spec: BlockSpec,
    element_bytes: tuple[int, int, int],
    precondition_frequency: int,
    max_skipped_refreshes: int | None = None,
) -> BlockState:
    """The state a block of this layout allocates and its refresh cost.

    Args:
        spec: the block's layout.
        element_bytes: bytes per element of the moments, the factors and the bases.
        precondition_frequency: refresh interval of the bases.
        max_skipped_refreshes: the adaptive refresh's bound (None: no adaptive refresh).

    Returns:
        Its state; :data:`NO_STATE` for a block without elements (SOAP leaves it alone).
    """
    if spec.numel == 0:
        return NO_STATE
    moment, factor, basis = element_bytes
    squares = spec.rows * sum(d * d for d in spec.factor_dims)
    most, fewest = refresh_flops(spec, precondition_frequency, max_skipped_refreshes)
    return BlockState(
        moments=2 * spec.state_numel * moment,  # blocks' padding included
        factors=squares * factor,
        bases=squares * basis,
        refresh_flops=most,
        refresh_flops_fewest=fewest,
    )
