"""When each block refreshes its eigenbases: the reference's aligned schedule, or staggered.

Aligned (the reference): every block refreshes when its update count ``t`` is a multiple of
``precondition_frequency`` f, so one step in f pays for every QR at once. Staggered: block i
refreshes when ``t + offset_i`` is a multiple of f, still every f updates, with the offsets
chosen so each of the f phases carries about the same refresh cost (greedy longest-processing
-time over the phases, cost ``sum d^3`` over the block's factored dims). The offsets depend only
on the blocks' shapes and order, so every rank, and a single process, computes the same ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distsoap.engine.block_engine import BlockEngine

SCHEDULES = ("aligned", "staggered")


def refresh_offsets(costs: list[float], frequency: int) -> list[int]:
    """Phases in ``[0, frequency)`` that balance the refresh cost of the blocks over a cycle.

    Args:
        costs: refresh cost per block, in a fixed order.
        frequency: the blocks' ``precondition_frequency``.
    """
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    loads = [0.0] * frequency
    offsets = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        phase = min(range(frequency), key=lambda p: (loads[p], p))
        loads[phase] += costs[i]
        offsets[i] = phase
    return offsets


def staggered_offsets(engine: BlockEngine) -> dict[int, int]:
    """``id(param)`` -> refresh phase for every trainable parameter of ``engine``.

    Blocks are balanced among those sharing a ``precondition_frequency``; the cost of a block is
    that of the tensor its strategy preconditions (the whole matrix in lossless modes).
    """
    by_frequency: dict[int, list] = defaultdict(list)
    for group in engine.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                spec = engine.block_spec(p, group, engine.state_shape(p))
                # full_rows: a rank holding some blocks of it phases the whole parameter as
                # every other rank does
                cost = float(spec.full_rows * sum(d**3 for d in spec.factor_dims))
                by_frequency[group["precondition_frequency"]].append((p, cost))
    offsets = {}
    for frequency, blocks in by_frequency.items():
        phases = refresh_offsets([cost for _, cost in blocks], frequency)
        offsets.update({id(p): phase for (p, _), phase in zip(blocks, phases)})
    return offsets
