"""Split parameters exchanged directly between shard holders and piece owners.

Under the lossless sharded strategies a split parameter's blocks have several owners
(:func:`~distsoap.placement.place_blocks`). In general one owner, the assembler, gathers the
whole gradient and sends the others their rows, then gathers their update rows back
(:class:`~distsoap.strategies.sharded.ShardedLossless`): each row it does not hold travels twice.
Where a block is a box of the parameter's own dims, each rank can instead send every owner the
parts of its shard that fall in that owner's blocks, and each owner send every rank the parts of
its update that fall in that rank's shard: the same bytes as a parameter placed whole, with no
assembler. :func:`direct_exchange_applies` says where.

Every shard the sharded strategies meet is a few boxes of the parameter (*slabs*): a range of
the flattened parameter (FSDP2's ``Shard(0)`` and HSDP's replicas of it, FSDP1's and DeepSpeed's
flat pieces) is whole dim-0 rows in the middle and partial rows at its ends
(:func:`flat_slabs`; one box for a ``Shard(0)`` range), and a DTensor box (FSDP2 over tensor
parallel, :class:`~distsoap.box_layout.BoxLayout`) is the product of its runs of consecutive
indices per dim (:func:`box_slabs`; one box unless a strided shard interleaves rows). A block
meets a slab in a box (:func:`box_parts`), so every part is a strided view of the shard and of
the block, copied once. Both sides enumerate the same parts in
the same order from the metadata alone (the owner's rows in sorted order, each row's box clipped
to the shard's slabs in order), so nothing but the values and one flag per (parameter, sender,
receiver) travels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from distsoap.box_layout import Box, BoxLayout
from distsoap.engine.blocks import BlockSpec
from distsoap.sharding import Layout, ShardLayout


@dataclass(frozen=True)
class Slab:
    """A box of a parameter that is a view of a rank's piece of it."""

    origin: tuple[int, ...]
    """The box's first index in the parameter, per dim."""
    shape: tuple[int, ...]
    """The box's extent per dim (1 on the leading dims a flat run does not span)."""
    piece_shape: tuple[int, ...]
    """The shape the piece is seen in to cut the box out: ``(n,)`` for a flat range of ``n``
    elements, the local tensor's shape for a DTensor box."""
    in_piece: tuple[slice, ...]
    """Where the box is in the piece seen in ``piece_shape``."""

    def view(self, piece: torch.Tensor) -> torch.Tensor:
        """The box in ``piece`` (any shape with its numel).

        A view where ``piece`` is contiguous, else a copy (fine to read, not to write).
        """
        return piece.reshape(self.piece_shape)[self.in_piece].reshape(self.shape)


@dataclass(frozen=True)
class BoxPart:
    """The parts of ``count`` blocks side by side that lie in one slab of one rank's shard.

    The blocks are consecutive rows of the owner's piece, neighbours along the parameter's
    last dim and each whole along it (one copy for a run of blocks instead of one per block).
    """

    position: int
    """The first block's position among the owner's rows (its index in the piece's row form)."""
    slab: int
    """Which of the shard's slabs (:func:`slabs_of`) holds the part."""
    in_slab: tuple[slice, ...]
    """Where the part is in the slab (``Slab.shape``): all ``count`` blocks' parts."""
    in_block: tuple[slice, ...]
    """Where each block's part is in its block (``block_shape``; the rest of the block is
    padding or other shards)."""
    numel: int
    """Its number of elements."""
    count: int = 1
    """How many blocks, side by side along the last dim."""

    def of_slab(self, slab: torch.Tensor) -> torch.Tensor:
        """The part in a slab's view, as ``(count, *in_block's shape)`` (a view)."""
        region = slab[self.in_slab]
        return region.unflatten(-1, (self.count, -1)).movedim(-2, 0)

    def of_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The part in a piece in row form, as ``(count, *in_block's shape)`` (a view)."""
        return blocks[self.position : self.position + self.count][(slice(None), *self.in_block)]


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
    a few boxes (:func:`slabs_of`): one range of the flattened parameter
    (:attr:`~distsoap.sharding.ShardLayout.flat_ranges`: FSDP2's ``Shard(0)`` with or without
    HSDP replicas, FSDP1's and DeepSpeed's flat pieces) or a DTensor box (FSDP2 over tensor
    parallel); not FSDP2's ``Shard(d)`` of a later dim, whose ranges are columns.
    """
    if isinstance(layout, ShardLayout) and not layout.pieces_concatenate:
        return False
    return tuple(layout.full_shape) == tuple(spec.param_shape) and blocks_are_boxes(spec)


def slabs_of(layout: Layout, rank: int) -> list[Slab]:
    """``rank``'s piece of a parameter as slabs (:func:`direct_exchange_applies` layouts)."""
    if isinstance(layout, BoxLayout):
        return box_slabs(layout.boxes[rank])
    return flat_slabs(layout.full_shape, *layout.flat_ranges[rank])


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
        run = slice(at - start, at - start + count * strides[dim])
        slabs.append(Slab(tuple(index), extent, (stop - start,), (run,)))
        at += count * strides[dim]
    return slabs


def box_slabs(box: Box) -> list[Slab]:
    """A DTensor box (per dim, the global indices held, in local order) as slabs.

    Per dim the indices are cut into runs of consecutive ones; each combination of runs is one
    slab (one in all unless a strided shard interleaves the indices of a dim).
    """
    piece_shape = tuple(len(indices) for indices in box)
    if 0 in piece_shape:
        return []
    runs_per_dim = []
    for indices in box:
        runs, begin = [], 0  # (local start, global start, length)
        for at in range(1, len(indices) + 1):
            if at == len(indices) or indices[at] != indices[at - 1] + 1:
                runs.append((begin, indices[begin], at - begin))
                begin = at
        runs_per_dim.append(runs)
    slabs = []
    for combination in itertools.product(*runs_per_dim):
        slabs.append(
            Slab(
                origin=tuple(g for _, g, _ in combination),
                shape=tuple(n for _, _, n in combination),
                piece_shape=piece_shape,
                in_piece=tuple(slice(lo, lo + n) for lo, _, n in combination),
            )
        )
    return slabs


def box_parts(spec: BlockSpec, rows: tuple[int, ...], slabs: list[Slab]) -> list[BoxPart]:
    """The parts of the blocks ``rows`` (sorted) that lie in a shard's ``slabs``.

    Args:
        spec: the whole parameter's spec (:func:`direct_exchange_applies`).
        rows: the owner's blocks, as rows of the stacked state (row-major over the grid).
        slabs: the shard's boxes (:func:`flat_slabs`).

    Returns:
        Per slab in order, the parts of the blocks that meet it in the order of ``rows``, each
        run of blocks side by side along the last dim (whole along it) merged into one part.
    """
    parts: list[BoxPart] = []
    sizes, shape = spec.block_shape, spec.merged_shape
    bounds = []  # per row: its block's first and last index + 1, per dim
    for row in rows:
        index = []
        for g in reversed(spec.grid):  # row-major over the grid
            index.append(row % g)
            row //= g
        index.reverse()
        firsts = [i * size for i, size in zip(index, sizes, strict=True)]
        lasts = [min(f + size, d) for f, size, d in zip(firsts, sizes, shape, strict=True)]
        bounds.append((firsts, lasts))
    for number, slab in enumerate(slabs):
        for position, (firsts, lasts) in enumerate(bounds):
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
                part = BoxPart(position, number, tuple(in_slab), tuple(in_block), numel)
                before = parts[-1] if parts else None
                # merge with the part before when the blocks are neighbours along the last dim
                # (next position, same rows, the columns go on) and equal parts of their blocks
                # (so, whole along the last dim: a block cut by the slab has no such neighbour)
                if (
                    before is not None
                    and before.slab == number
                    and before.position + before.count == position
                    and before.in_block == part.in_block
                    and before.in_slab[:-1] == part.in_slab[:-1]
                    and before.in_slab[-1].stop == part.in_slab[-1].start
                ):
                    side_by_side = slice(before.in_slab[-1].start, part.in_slab[-1].stop)
                    parts[-1] = BoxPart(
                        before.position,
                        number,
                        (*before.in_slab[:-1], side_by_side),
                        before.in_block,
                        before.numel + numel,
                        before.count + 1,
                    )
                else:
                    parts.append(part)
    return parts


def gather_parts(piece: torch.Tensor, slabs: list[Slab], parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a shard cut into ``slabs``, one after the other (1-D)."""
    if not parts:
        return piece.new_empty(0)
    views = [slab.view(piece) for slab in slabs]
    return torch.cat([p.of_slab(views[p.slab]).reshape(-1) for p in parts])


def gather_block_parts(blocks: torch.Tensor, parts: list[BoxPart]) -> torch.Tensor:
    """The values of ``parts`` of a piece in row form ``(rows, *block_shape)`` (1-D)."""
    if not parts:
        return blocks.new_empty(0)
    return torch.cat([p.of_blocks(blocks).reshape(-1) for p in parts])


def scatter_parts(
    piece: torch.Tensor, slabs: list[Slab], values: torch.Tensor, parts: list[BoxPart]
) -> None:
    """Write ``values`` (laid out as :func:`gather_parts` does) into a contiguous piece."""
    views = [slab.view(piece) for slab in slabs]
    offset = 0
    for p in parts:
        region = p.of_slab(views[p.slab])
        region.copy_(values[offset : offset + p.numel].view(region.shape))
        offset += p.numel


def scatter_block_parts(blocks: torch.Tensor, values: torch.Tensor, parts: list[BoxPart]) -> None:
    """Write ``values`` (laid out as :func:`gather_block_parts` does) into a piece in row form."""
    offset = 0
    for p in parts:
        region = p.of_blocks(blocks)
        region.copy_(values[offset : offset + p.numel].view(region.shape))
        offset += p.numel
