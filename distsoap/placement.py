"""Placement: which rank owns (stores and computes) each block.

Every rank runs the same deterministic assignment on the same metadata, so no communication is
needed to agree on it. The cost of a block has two parts that must both be balanced:

- compute per step: rotations in and out and the two factor products, ``~3 * numel * d_i`` per
  factored dim i (``m^2 n + m n^2``-type terms), plus the refresh amortised over the cycle,
  ``~2 d_i^3 / precondition_frequency`` (one ``GG Q`` product and one QR);
- state bytes: the two moments and, per factored dim, a factor and a basis.

The assignment is a vector form of greedy longest-processing-time: blocks in descending order of
their larger normalised cost, each given to the rank whose larger normalised load after adding it
is smallest (ties to the lowest rank). A short local search then moves or swaps blocks between
the most loaded rank and the others while that lowers the pair's larger load (moves only, when
there are more than :data:`SWAP_SEARCH_LIMIT` blocks: swaps cost the square of their number).

:func:`place_blocks` may place the blocks of stacked and blocked parameters (``stack_dims``,
``block_size``) one by one: each block of a parameter may get its own owner, and each owner
then holds a *piece* of the parameter (some of its rows). A split costs work a whole parameter
does not (its gradient cut into rows on each owner, the pieces put back together on every
rank), so parameters are split only where they are needed: when placing them whole leaves the
busiest rank more than :data:`SPLIT_ABOVE_IMBALANCE` above the mean, and then only those whose
cost is more than a quarter of a rank's fair share (LPT then keeps the busiest rank within
about a quarter share of the mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distsoap.engine.blocks import BlockSpec

SWAP_SEARCH_LIMIT = 256
"""Above this many blocks the local search only moves blocks (see the module docstring)."""
SPLIT_ABOVE_IMBALANCE = 0.05
"""Split parameters only when whole ones leave the busiest rank this far above the mean."""
SPLIT_BLOCKS = ("auto", "never")
"""The values of SOAP's ``split_blocks``: split where needed (above), or never."""


@dataclass(frozen=True)
class BlockCost:
    """Modelled cost of one block."""

    flops: float
    """Multiply-adds per step, refresh amortised."""
    state_bytes: int
    """Bytes of SOAP state the owner holds."""


def block_cost(
    spec: BlockSpec,
    precondition_frequency: int,
    moment_bytes: int = 4,
    factor_bytes: int = 4,
    basis_bytes: int | None = None,
) -> BlockCost:
    """Cost model of one block (see the module docstring).

    Args:
        spec: the block's layout.
        precondition_frequency: refresh interval of the block's bases.
        moment_bytes: bytes per element of ``exp_avg`` / ``exp_avg_sq``.
        factor_bytes: bytes per element of the factors.
        basis_bytes: bytes per element of the bases (default: ``factor_bytes``).

    """
    basis_bytes = factor_bytes if basis_bytes is None else basis_bytes
    numel = spec.state_numel  # the padding of blocks (block_size) included
    flops = float(numel) * 4  # elementwise Adam, applying the update: never zero
    state = 2 * numel * moment_bytes
    for d in spec.factor_dims:  # a stack of matrices has a factor and a basis per matrix
        flops += 3.0 * numel * d + spec.rows * 2.0 * d**3 / precondition_frequency
        state += spec.rows * d * d * (factor_bytes + basis_bytes)
    return BlockCost(flops, state)


def assign_owners(costs: list[BlockCost], world_size: int) -> list[int]:
    """Give every block an owner rank, balancing compute and state bytes together.

    Args:
        costs: one cost per block, in a fixed order shared by every rank.
        world_size: number of ranks.

    Returns:
        The owner rank of each block.

    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total_flops = sum(c.flops for c in costs) or 1.0
    total_bytes = sum(c.state_bytes for c in costs) or 1
    normalised = [(c.flops / total_flops, c.state_bytes / total_bytes) for c in costs]
    order = sorted(range(len(costs)), key=lambda i: (-max(normalised[i]), i))
    # the loads of every rank as one fp64 tensor: one vector op per block (ties: argmin gives
    # the first, the lowest rank), the same sums as scalar code
    flops_load = torch.zeros(world_size, dtype=torch.float64)
    bytes_load = torch.zeros(world_size, dtype=torch.float64)
    owners = [0] * len(costs)
    for i in order:
        f, b = normalised[i]
        rank = int(torch.maximum(flops_load + f, bytes_load + b).argmin())
        flops_load[rank] += f
        bytes_load[rank] += b
        owners[i] = rank
    loads = list(zip(flops_load.tolist(), bytes_load.tolist()))
    _improve(owners, normalised, loads, swaps=len(costs) <= SWAP_SEARCH_LIMIT)
    return owners


@dataclass(frozen=True)
class Piece:
    """What one owner computes of a parameter: all of it, or some of its blocks."""

    param: int
    """Index of the parameter in the placed list."""
    owner: int
    """The rank that holds this piece's state and computes its update."""
    rows: tuple[int, ...] | None
    """The parameter's blocks (rows of its stacked state, sorted) in this piece; None: the
    whole parameter, which has this one owner."""


def place_blocks(
    costs: list[BlockCost], rows: list[int], splittable: list[bool], world_size: int
) -> list[Piece]:
    """Give every block an owner; a parameter whose blocks went to several ranks is split.

    Args:
        costs: per parameter, the cost of all of it (:func:`block_cost`).
        rows: per parameter, its number of blocks (rows of its state; 1 if not stacked).
        splittable: per parameter, whether its blocks may have different owners.
        world_size: number of ranks.

    Returns:
        One piece per (parameter, owner), by parameter, then owner.
    """
    whole = assign_owners(costs, world_size)
    balance = load_balance(costs, whole, world_size)
    if not any(splittable) or max(balance.values()) <= 1 + SPLIT_ABOVE_IMBALANCE:
        return [Piece(i, owner, None) for i, owner in enumerate(whole)]
    total_flops = sum(c.flops for c in costs) or 1.0
    total_bytes = sum(c.state_bytes for c in costs) or 1
    quarter_share = 1 / (4 * world_size)
    units: list[tuple[int, int | None]] = []
    unit_costs: list[BlockCost] = []
    for i, (cost, n, split) in enumerate(zip(costs, rows, splittable, strict=True)):
        share = max(cost.flops / total_flops, cost.state_bytes / total_bytes)
        if n > 1 and split and share > quarter_share:
            # every cost term is linear in the rows (block_cost): exact per-block shares
            each = BlockCost(cost.flops / n, cost.state_bytes // n)
            units += [(i, r) for r in range(n)]
            unit_costs += [each] * n
        else:
            units.append((i, None))
            unit_costs.append(cost)
    owners = assign_owners(unit_costs, world_size)
    by_param: dict[int, dict[int, list[int]]] = {}
    for (i, row), owner in zip(units, owners):
        by_param.setdefault(i, {}).setdefault(owner, []).append(-1 if row is None else row)
    pieces = []
    for i in range(len(costs)):
        held = by_param[i]
        if len(held) == 1:
            pieces.append(Piece(i, next(iter(held)), None))
            continue
        pieces += [Piece(i, owner, tuple(sorted(held[owner]))) for owner in sorted(held)]
    return pieces


def choose_assemblers(pieces: list[Piece], row_numel: list[int], world_size: int) -> dict[int, int]:
    """The owner that assembles each split parameter under the sharded strategies.

    Under ``fsdp2``, ``fsdp1`` and DeepSpeed ZeRO 1-3 one owner of a split parameter, its
    *assembler*, gathers the whole gradient, sends every other owner its rows and receives
    their update rows back (:class:`~distsoap.strategies.sharded.ShardedLossless`): each row it
    does not hold travels out and back through it. Taking the owner of the most rows alone
    would pile every parameter's round trip onto the same ranks, so the parameters are taken
    largest first and each goes to the owner whose round-trip traffic after taking it is the
    least (ties: the owner of more rows, then the lowest rank). The same on every rank.

    Args:
        pieces: :func:`place_blocks`'s pieces (whole parameters are left alone).
        row_numel: per parameter, the elements of one row of its state (one block).
        world_size: number of ranks.

    Returns:
        Split parameter -> its assembler rank.
    """
    held: dict[int, dict[int, int]] = {}
    for piece in pieces:
        if piece.rows is not None:
            held.setdefault(piece.param, {})[piece.owner] = len(piece.rows)
    traffic = [0] * world_size  # elements each rank sends and receives in the round trips
    for param, rows in held.items():
        for owner, n in rows.items():
            traffic[owner] += 2 * n * row_numel[param]  # as a non-assembling owner
    chosen: dict[int, int] = {}
    by_size = sorted(held, key=lambda i: (-sum(held[i].values()) * row_numel[i], i))
    for param in by_size:
        rows, total = held[param], sum(held[param].values())

        def after(owner: int, rows=rows, total=total, param=param) -> int:
            # its own rows stay; every other row goes out and comes back through it
            return traffic[owner] + 2 * (total - 2 * rows[owner]) * row_numel[param]

        best = min(rows, key=lambda o: (after(o), -rows[o], o))
        traffic[best] = after(best)
        chosen[param] = best
    return chosen


def _improve(
    owners: list[int],
    costs: list[tuple[float, float]],
    loads: list[tuple[float, float]],
    swaps: bool = True,
) -> None:
    """Local search: move (or swap) blocks off the most loaded rank while that helps."""

    def worst(load: tuple[float, float]) -> float:
        return max(load)

    def shifted(load, out, into):
        return (load[0] - out[0] + into[0], load[1] - out[1] + into[1])

    zero = (0.0, 0.0)
    for _ in range(4 * len(owners)):
        top = max(range(len(loads)), key=lambda r: (worst(loads[r]), -r))
        best = (worst(loads[top]), None)
        for i in (i for i, o in enumerate(owners) if o == top):
            for other in range(len(loads)):
                if other == top:
                    continue
                candidates = [(None, zero)]
                if swaps:
                    candidates += [(j, costs[j]) for j, o in enumerate(owners) if o == other]
                for j, back in candidates:
                    new_top = shifted(loads[top], costs[i], back)
                    new_other = shifted(loads[other], back, costs[i])
                    score = max(worst(new_top), worst(new_other))
                    if score < best[0] - 1e-12:
                        best = (score, (i, j, other, new_top, new_other))
        if best[1] is None:
            return
        i, j, other, new_top, new_other = best[1]
        owners[i] = other
        if j is not None:
            owners[j] = top
        loads[top], loads[other] = new_top, new_other


def load_balance(costs: list[BlockCost], owners: list[int], world_size: int) -> dict[str, float]:
    """Max over mean of the per-rank modelled compute and state bytes (1.0 is perfect)."""
    flops = [0.0] * world_size
    state = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        flops[owner] += cost.flops
        state[owner] += cost.state_bytes
    mean_f = sum(flops) / world_size or 1.0
    mean_b = sum(state) / world_size or 1.0
    return {"flops": max(flops) / mean_f, "state_bytes": max(state) / mean_b}
