"""Every owner's SOAP state in one state dict, for frameworks that save one rank's copy.

Under a sharded strategy each rank's ``state_dict()`` holds the blocks that rank owns (see
:mod:`distsoap.checkpointing.state_dict`). Frameworks that write ``optimizer.state_dict()`` from
rank 0 alone and load that file on every rank (HF Trainer under DDP, Lightning's DDP strategy,
DeepSpeed's stage 0) need rank 0's dict to hold every block. Rank 0 cannot ask the others for their
state from inside ``state_dict()`` when it is the only rank calling it, so the gather is a separate
collective that every rank enters before the save: :meth:`distsoap.SOAP.consolidate_state_dict` (the
name and meaning of torch's ``ZeroRedundancyOptimizer.consolidate_state_dict``, which Lightning
calls on every rank before it saves an optimizer that has it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def to_host(entry: dict[str, Any]) -> dict[str, Any]:
    """A block's state with every tensor copied to the CPU (never a view of a live bucket)."""
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        for k, v in entry.items()
    }


def gather_block_states(
    packed: dict[int, dict[str, Any]], group: dist.ProcessGroup | None, to: int | None
) -> dict[int, dict[str, Any]] | None:
    """Gather the non-empty entries of every rank's packed optimizer state (collective).

    Args:
        packed: this rank's ``state_dict()["state"]`` (index -> the block's state).
        group: the process group the blocks are spread over.
        to: the group rank that receives the merged state; None gives it to every rank.

    Returns:
        The merged state (index -> state; entries of one index from several ranks are merged,
        as local-shard state with rank-suffixed keys is) on the receiving rank(s), with every
        tensor on the CPU; None on the other ranks.
    """
    mine = {index: to_host(entry) for index, entry in packed.items() if entry}
    world = dist.get_world_size(group)
    if to is None:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
    else:
        receiving = dist.get_rank(group) == to
        gathered = [None] * world if receiving else None
        dist.gather_object(
            mine, gathered, dst=dist.get_global_rank(group, to) if group else to, group=group
        )
        if not receiving:
            return None
    merged: dict[int, dict[str, Any]] = {}
    for part in gathered:
        for index, entry in part.items():
            merged.setdefault(index, {}).update(entry)
    return merged


def merge_consolidated(
    packed: dict[int, dict[str, Any]], consolidated: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Fill the blocks of a consolidation into this rank's packed state.

    This rank's own entries win: they are the live state, the consolidated copy of them is the
    same values.
    """
    merged = dict(packed)
    for index, entry in consolidated.items():
        merged[index] = {**entry, **merged.get(index, {})}
    return merged
