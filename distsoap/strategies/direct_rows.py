"""Split parameters exchanged directly between shard holders and piece owners.

Under the lossless sharded strategies a split parameter's blocks have several owners
(:func:`~distsoap.placement.place_blocks`). In general one owner, the assembler, gathers the
whole gradient and sends the others their rows, then gathers their update rows back
(:class:`~distsoap.strategies.sharded.ShardedLossless`): each row it does not hold travels twice.
Where a block is a box of the parameter's own dims and every rank holds a range of dim 0 (FSDP2's
default ``Shard(0)``, also HSDP's replicas of it), each rank can instead send every owner the
parts of its shard that fall in that owner's blocks, and each owner send every rank the parts of
its update that fall in that rank's shard: the same bytes as a parameter placed whole, with no
assembler. :func:`direct_exchange_applies` says where; :func:`box_parts` cuts.

Both sides enumerate the same parts in the same order from the metadata alone (the owner's
rows in sorted order, each row's box clipped to the shard's range), so nothing but the values
and one flag per (parameter, sender, receiver) travels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distsoap.engine.blocks import BlockSpec
from distsoap.sharding import Layout, ShardLayout


@dataclass(frozen=True)
class BoxPart:
    """The part of one block that lies in one rank's shard."""

    position: int
    """The block's position among the owner's rows (its index in the piece's row form)."""
    in_shard: tuple[slice, ...]
    """Where the part is in the shard (the shard's dim 0 counted from its own start)."""
    in_block: tuple[slice, ...]
    """Where the part is in the block (``block_shape``; the rest of the block is padding or
    other shards)."""
    numel: int
    """Its number of elements."""


def blocks_are_boxes(spec: BlockSpec) -> bool:
    """Whether every block of a parameter is a box of its own dims.

    So with a grid (``block_size``) and no ``channels_last`` permutation, merged dims or stack
    dims.
    """
    return (
        spec.blocked
        and not spec.channels_last
        and not spec.stack_shape
        and tuple(spec.merged_shape) == tuple(spec.param_shape)
    )


def direct_exchange_applies(spec: BlockSpec, layout: Layout) -> bool:
    """Whether a split parameter's blocks can go straight between holders and owners.

    Its blocks must be boxes of its own dims (:func:`blocks_are_boxes`) and its shards ranges of
    dim 0 of its own shape (FSDP2's ``Shard(0)``, with or without HSDP replicas).
    """
    return (
        isinstance(layout, ShardLayout)
        and layout.dim == 0
        and tuple(layout.split_shape) == tuple(layout.full_shape)
        and blocks_are_boxes(spec)
    )


def box_parts(spec: BlockSpec, rows: tuple[int, ...], start: int, stop: int) -> list[BoxPart]:
    """The parts of the blocks ``rows`` (sorted) that lie in dim-0 range ``[start, stop)``.

    Args:
        spec: the whole parameter's spec (:func:`direct_exchange_applies`).
        rows: the owner's blocks, as rows of the stacked state (row-major over the grid).
        start: the first dim-0 index of the shard.
        stop: one past its last.

    Returns:
        One part per block that meets the shard, in the order of ``rows``.
    """
    parts = []
    sizes, shape = spec.block_shape, spec.merged_shape
    for position, row in enumerate(rows):
        index = []
        for g in reversed(spec.grid):  # row-major over the grid
            index.append(row % g)
            row //= g
        index.reverse()
        first = index[0] * sizes[0]
        low, high = max(first, start), min(first + sizes[0], shape[0], stop)
        if high <= low:
            continue
        in_shard = [slice(low - start, high - start)]
        in_block = [slice(low - first, high - first)]
        for dim in range(1, len(sizes)):
            begin = index[dim] * sizes[dim]
            end = min(begin + sizes[dim], shape[dim])
            in_shard.append(slice(begin, end))
            in_block.append(slice(0, end - begin))
        numel = math.prod(s.stop - s.start for s in in_shard)
        parts.append(BoxPart(position, tuple(in_shard), tuple(in_block), numel))
    return parts


def gather_parts(shard: torch.Tensor, parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a shard, one after the other (1-D)."""
    if not parts:
        return shard.new_empty(0)
    return torch.cat([shard[p.in_shard].reshape(-1) for p in parts])


def gather_block_parts(blocks: torch.Tensor, parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a piece in row form ``(rows, *block_shape)`` (1-D)."""
    if not parts:
        return blocks.new_empty(0)
    return torch.cat([blocks[(p.position, *p.in_block)].reshape(-1) for p in parts])


def scatter_parts(target: torch.Tensor, values: torch.Tensor, parts: list[BoxPart], blocks: bool):
    """Write ``values`` (as :func:`gather_parts` laid them out) into the parts of ``target``.

    Args:
        target: a shard, or with ``blocks`` a piece in row form.
        values: the parts' values, one after the other.
        parts: where they go.
        blocks: whether ``target`` is a piece in row form (else a shard).
    """
    offset = 0
    for p in parts:
        where = (p.position, *p.in_block) if blocks else p.in_shard
        region = target[where]
        region.copy_(values[offset : offset + p.numel].view(region.shape))
        offset += p.numel
