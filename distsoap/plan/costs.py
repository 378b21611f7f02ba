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
``O(numel * d)``) are not included; nor are retries of a failed QR. With the adaptive refresh
(``refresh_tolerance`` > 0) a due refresh may be skipped, so the figure is then an upper bound.

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
        )

    def times(self, copies: int) -> BlockState:
        """The state of ``copies`` copies of this block."""
        return BlockState(
            copies * self.moments,
            copies * self.factors,
            copies * self.bases,
            copies * self.refresh_flops,
        )


NO_STATE = BlockState(0, 0, 0, 0.0)
"""A block that holds nothing here (another rank owns it, or it has no elements)."""


def refresh_flops(spec: BlockSpec, precondition_frequency: int) -> float:
    """Modelled FLOPs per step of the block's eigenbasis refreshes (see the module docstring)."""
    per_refresh = sum((PRODUCT_FLOPS + QR_FLOPS) * d**3 for d in spec.factor_dims)
    return spec.rows * per_refresh / precondition_frequency


def block_state(
    spec: BlockSpec,
    element_bytes: tuple[int, int, int],
    precondition_frequency: int,
) -> BlockState:
    """The state a block of this layout allocates and its refresh cost.

    Args:
        spec: the block's layout.
        element_bytes: bytes per element of the moments, the factors and the bases.
        precondition_frequency: refresh interval of the bases.

    Returns:
        Its state; :data:`NO_STATE` for a block without elements (SOAP leaves it alone).
    """
    if spec.numel == 0:
        return NO_STATE
    moment, factor, basis = element_bytes
    squares = spec.rows * sum(d * d for d in spec.factor_dims)
    return BlockState(
        moments=2 * spec.state_numel * moment,  # blocks' padding included
        factors=squares * factor,
        bases=squares * basis,
        refresh_flops=refresh_flops(spec, precondition_frequency),
    )
