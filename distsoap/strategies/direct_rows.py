"""Split parameters exchanged directly between shard holders and piece owners.

Under the lossless sharded strategies a split parameter's blocks have several owners
(:func:`~distsoap.placement.place_blocks`). In general one owner, the assembler, gathers the
whole gradient and sends the others their rows, then gathers their update rows back
(:class:`~distsoap.strategies.sharded.ShardedLossless`): each row it does not hold travels twice.
Where a block is a box of the parameter's own dims and every rank holds one range of the
flattened parameter (FSDP2's default ``Shard(0)`` and HSDP's replicas of it, FSDP1's and
DeepSpeed's flat pieces), each rank can instead send every owner the parts of its shard that
fall in that owner's blocks, and each owner send every rank the parts of its update that fall in
that rank's shard: the same bytes as a parameter placed whole, with no assembler.
:func:`direct_exchange_applies` says where.

A flat range of a parameter is a few boxes, each one contiguous run of the range
(:func:`flat_slabs`: whole dim-0 rows in the middle, partial rows at the ends; one box for a
``Shard(0)`` range), and a block meets a box in a box (:func:`box_parts`), so every part is a
strided view of the shard and of the block, copied once. Both sides enumerate the same parts in
the same order from the metadata alone (the owner's rows in sorted order, each row's box clipped
to the shard's slabs in order), so nothing but the values and one flag per (parameter, sender,
receiver) travels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distsoap.engine.blocks import BlockSpec
from distsoap.sharding import Layout, ShardLayout


@dataclass(frozen=True)
class Slab:
    """A box of a parameter that is one contiguous run of a rank's flat piece of it."""

    offset: int
    """Where the run starts in the piece (elements from the piece's start)."""
    origin: tuple[int, ...]
    """The box's first index in the parameter, per dim."""
    shape: tuple[int, ...]
    """The box's extent per dim (1 on the leading dims it does not span)."""


@dataclass(frozen=True)
class BoxPart:
    """The part of one block that lies in one slab of one rank's shard."""

    position: int
    """The block's position among the owner's rows (its index in the piece's row form)."""
    slab: int
    """Which of the shard's slabs (:func:`flat_slabs`) holds the part."""
    in_slab: tuple[slice, ...]
    """Where the part is in the slab (``Slab.shape``)."""
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

    Its blocks must be boxes of its own dims (:func:`blocks_are_boxes`) and every rank's piece
    one range of the flattened parameter (:attr:`~distsoap.sharding.ShardLayout.flat_ranges`:
    FSDP2's ``Shard(0)`` with or without HSDP replicas, FSDP1's and DeepSpeed's flat pieces; not
    FSDP2 over tensor parallel, whose pieces are boxes across several dims).
    """
    return (
        isinstance(layout, ShardLayout)
        and layout.pieces_concatenate
        and tuple(layout.full_shape) == tuple(spec.param_shape)
        and blocks_are_boxes(spec)
    )


def flat_slabs(shape: tuple[int, ...], start: int, stop: int) -> list[Slab]:
    """The elements ``[start, stop)`` of a flattened parameter of ``shape``, as boxes.

    From ``start`` on, each box is the largest run that is a box: whole sub-tensors of the
    outermost dim whose inner indices start at 0 and that fit before ``stop`` (at most
    ``2 * len(shape) - 1`` boxes; one for a range of whole dim-0 rows).

    Args:
        shape: the parameter's shape.
        start: the first element of the range (row-major).
        stop: one past its last.

    Returns:
        The boxes in order; their runs tile the range.
    """
    shape = tuple(shape) or (1,)
    strides = [math.prod(shape[dim + 1 :]) for dim in range(len(shape))]
    slabs = []
    at = start
    while at < stop:
        index = [(at // stride) % size for stride, size in zip(strides, shape, strict=True)]
        # the outermost dim whose inner indices are all 0 and one step of which fits (the
        # innermost always does)
        dim = next(d for d, s in enumerate(strides) if at % s == 0 and at + s <= stop)
        count = min((stop - at) // strides[dim], shape[dim] - index[dim])
        extent = (1,) * dim + (count,) + shape[dim + 1 :]
        slabs.append(Slab(at - start, tuple(index), extent))
        at += count * strides[dim]
    return slabs


def box_parts(spec: BlockSpec, rows: tuple[int, ...], slabs: list[Slab]) -> list[BoxPart]:
    """The parts of the blocks ``rows`` (sorted) that lie in a shard's ``slabs``.

    Args:
        spec: the whole parameter's spec (:func:`direct_exchange_applies`).
        rows: the owner's blocks, as rows of the stacked state (row-major over the grid).
        slabs: the shard's boxes (:func:`flat_slabs`).

    Returns:
        One part per (block, slab) that meet, blocks in the order of ``rows``, then slabs in
        theirs.
    """
    parts = []
    sizes, shape = spec.block_shape, spec.merged_shape
    for position, row in enumerate(rows):
        index = []
        for g in reversed(spec.grid):  # row-major over the grid
            index.append(row % g)
            row //= g
        index.reverse()
        firsts = [i * size for i, size in zip(index, sizes, strict=True)]
        lasts = [min(f + size, d) for f, size, d in zip(firsts, sizes, shape, strict=True)]
        for number, slab in enumerate(slabs):
            in_slab, in_block = [], []
            for first, last, origin, extent in zip(
                firsts, lasts, slab.origin, slab.shape, strict=True
            ):
                low, high = max(first, origin), min(last, origin + extent)
                if high <= low:
                    break
                in_slab.append(slice(low - origin, high - origin))
                in_block.append(slice(low - first, high - first))
            else:
                numel = math.prod(s.stop - s.start for s in in_slab)
                parts.append(BoxPart(position, number, tuple(in_slab), tuple(in_block), numel))
    return parts


def slab_views(piece: torch.Tensor, slabs: list[Slab]) -> list[torch.Tensor]:
    """Each slab of a flat piece as a view of its box shape."""
    flat = piece.reshape(-1)
    return [flat[s.offset : s.offset + math.prod(s.shape)].view(s.shape) for s in slabs]


def gather_parts(piece: torch.Tensor, slabs: list[Slab], parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a shard (a flat piece cut into ``slabs``), in order (1-D)."""
    if not parts:
        return piece.new_empty(0)
    views = slab_views(piece, slabs)
    return torch.cat([views[p.slab][p.in_slab].reshape(-1) for p in parts])


def gather_block_parts(blocks: torch.Tensor, parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a piece in row form ``(rows, *block_shape)`` (1-D)."""
    if not parts:
        return blocks.new_empty(0)
    return torch.cat([blocks[(p.position, *p.in_block)].reshape(-1) for p in parts])


def scatter_parts(
    piece: torch.Tensor, slabs: list[Slab], values: torch.Tensor, parts: list[BoxPart]
) -> None:
    """Write ``values`` (laid out as :func:`gather_parts` does) into a contiguous flat piece."""
    views = slab_views(piece, slabs)
    offset = 0
    for p in parts:
        region = views[p.slab][p.in_slab]
        region.copy_(values[offset : offset + p.numel].view(region.shape))
        offset += p.numel


def scatter_block_parts(blocks: torch.Tensor, values: torch.Tensor, parts: list[BoxPart]) -> None:
    """Write ``values`` (laid out as :func:`gather_block_parts` does) into a piece in row form."""
    offset = 0
    for p in parts:
        region = blocks[(p.position, *p.in_block)]
        region.copy_(values[offset : offset + p.numel].view(region.shape))
        offset += p.numel
