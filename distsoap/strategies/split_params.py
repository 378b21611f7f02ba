"""Split parameters: one parameter whose blocks have several owners.

:func:`~distsoap.placement.place_blocks` may give the blocks (rows) of a stacked or blocked
parameter different owners; each owner then holds the state of its *piece*, in row form
(``BlockSpec.holding``). What the strategies placing such pieces share is here:

- :func:`agree_on_split`: single-process SOAP decides two things per parameter, over all its
  blocks: a non-finite gradient skips the whole parameter, and a drift-guard verdict (any
  block's new low-precision bases drifting too far) moves all its bases to fp32. The owners of
  a split parameter decide them together, with one all-reduce, before the update.
- :func:`agree_on_skips`: the adaptive refresh skips a parameter's due refresh only while all its
  blocks are still diagonal; the owners of a split parameter combine what each measured.
- :func:`has_update`: whether the owners' update flags say the parameter has an update;
- :func:`join_pieces`: a parameter's delta from its pieces' deltas.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distsoap.comm import CommStats
from distsoap.engine.block_engine import BlockEngine
from distsoap.engine.blocks import BlockSpec


def agree_on_split(
    engine: BlockEngine,
    split: list[torch.Tensor],
    grads: dict[int, torch.Tensor],
    group: dist.ProcessGroup | None,
    device: torch.device,
    stats: CommStats,
) -> set[int]:
    """Decide, for every split parameter, what its owners must decide together.

    Every rank calls it with the same ``split`` list, each step, before the update: one
    all-reduce of ``2 x len(split)`` flags, per parameter whether some piece's gradient is
    non-finite and whether some piece's last refresh drifted. The drift verdicts are settled
    here (:meth:`BlockEngine.settle_drift`): nothing has used the new bases yet.

    Args:
        engine: the block engine (its fault policy, its deferred drift verdicts).
        split: the split parameters, in an order every rank shares.
        grads: ``id(param)`` -> the gradient this rank steps (a piece in row form).
        group: the process group.
        device: where the flags are reduced.
        stats: where to count the bytes.

    Returns:
        The split parameters (``id``) to skip as non-finite.
    """
    if not split:
        return set()
    flags = torch.zeros(2, len(split), device=device)
    mine = {j: grad for j, p in enumerate(split) if (grad := grads.get(id(p))) is not None}
    for j, finite in engine.faults.finite(mine).items():
        if not finite:
            flags[0, j] = 1.0
    drifts = engine.deferred_drift()
    for j, p in enumerate(split):
        if drifts.get(id(p), False):
            flags[1, j] = 1.0
    dist.all_reduce(flags, group=group)
    world = dist.get_world_size(group)
    stats.add("fault_check", flags.element_size() * flags.numel() * 2 * (world - 1) // world)
    bad, drifted = flags.tolist()
    if drifts:
        considered = {id(p) for p in split}
        engine.settle_drift({id(p) for j, p in enumerate(split) if drifted[j] > 0}, considered)
    return {id(p) for j, p in enumerate(split) if bad[j] > 0}


def agree_on_skips(
    split: list[torch.Tensor],
    pieces: list[int],
    local: dict[int, bool],
    group: dist.ProcessGroup | None,
    device: torch.device,
    stats: CommStats,
) -> set[int]:
    """The split parameters whose every piece is still diagonal (one all-reduce, every rank).

    Args:
        split: the split parameters, in an order every rank shares.
        pieces: per split parameter, its number of pieces.
        local: ``id(param)`` -> whether this rank's piece of it is still diagonal (held pieces
            whose adaptive refresh is due; every piece of a parameter is due at once).
        group: the process group.
        device: where the flags are reduced.
        stats: where to count the bytes.
    """
    if not split:
        return set()
    flags = torch.zeros(len(split), device=device)
    for j, p in enumerate(split):
        if local.get(id(p), False):
            flags[j] = 1.0
    dist.all_reduce(flags, group=group)
    world = dist.get_world_size(group)
    stats.add("fault_check", flags.element_size() * flags.numel() * 2 * (world - 1) // world)
    return {id(p) for j, p in enumerate(split) if flags[j].item() == pieces[j]}


def has_update(engine: BlockEngine, param: torch.Tensor, flags: list[bool]) -> bool:
    """Whether a split parameter has an update this step, from its owners' flags.

    Every owner computed one, or none did (they agreed on skipping it, :func:`agree_on_split`);
    owners that disagree are an internal error, raised with the parameter's name.
    """
    if not any(flags):
        return False
    if not all(flags):
        raise RuntimeError(
            f"internal error: the owners of parameter {engine.param_name(param)} disagree on "
            "whether it has an update this step"
        )
    return True


def join_pieces(
    spec: BlockSpec, pieces: list[tuple[tuple[int, ...], torch.Tensor]]
) -> torch.Tensor:
    """The parameter-shaped delta of a split parameter from its pieces' row-form deltas.

    Args:
        spec: the parameter's whole spec.
        pieces: per piece, its rows and its delta (any shape with ``len(rows) * block`` elements).
    """
    first = pieces[0][1]
    rows = first.new_zeros(spec.state_shape)  # the padding of blocks stays zero
    for held, delta in pieces:
        index = torch.tensor(held, device=rows.device)
        rows.index_copy_(0, index, delta.reshape(len(held), *spec.block_shape))
    return spec.from_rows(rows)
