"""The direct exchange's parts against the assembler's definition (``BlockSpec.to_rows``).

What an owner puts together from every shard holder's parts must be its rows of the whole
parameter in row form (padding zero), and what every rank puts together from every owner's
update parts must be its shard of the whole update. Shards are dim-0 ranges (FSDP2's
``Shard(0)``), flat ranges that cut rows anywhere (FSDP1, DeepSpeed) and DTensor boxes with
interleaved rows (FSDP2 over tensor parallel's strided shards).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distsoap.box_layout import BoxLayout
from distsoap.engine.blocks import make_block_spec
from distsoap.sharding import ShardLayout, chunk_range
from distsoap.strategies.direct_rows import (
    blocks_are_boxes,
    box_parts,
    box_slabs,
    direct_exchange_applies,
    flat_slabs,
    gather_block_parts,
    gather_parts,
    scatter_block_parts,
    scatter_parts,
    slabs_of,
)


def _spec(shape, block_size, **options):
    kwargs = dict(
        max_precond_dim=64, merge_dims=False, precondition_1d=True, data_format="channels_first"
    )
    kwargs.update(options)
    return make_block_spec(shape, block_size=block_size, **kwargs)


def _row_ranges(shape, world):
    inner = math.prod(shape[1:])
    return [tuple(inner * x for x in chunk_range(shape[0], world, r)) for r in range(world)]


def _flat_ranges(shape, world):
    """Uneven cuts that fall inside rows; from 3 ranks on, the last range empty (as DeepSpeed's
    can be)."""
    numel = math.prod(shape)
    if world < 3:
        inner = [numel // 2 + 1]
    else:
        inner = [numel * k // (world - 1) + 1 for k in range(1, world - 1)] + [numel]
    cuts = [0, *inner, numel]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _boxes(shape, world):
    """DTensor-like boxes: dim 0 dealt out two rows at a time to two row groups (as a strided
    shard does), the last dim cut in ``world // 2`` column ranges; ranks past those hold none."""
    rows = [tuple(i for i in range(shape[0]) if (i // 2) % 2 == g) for g in range(2)]
    columns = [tuple(range(*chunk_range(shape[-1], world // 2, c))) for c in range(world // 2)]
    middle = [tuple(range(d)) for d in shape[1:-1]]
    boxes = []
    for rank in range(world):
        if len(shape) == 1:
            box = (rows[rank],) if rank < 2 else ((),)
        elif rank < 2 * (world // 2):
            box = (rows[rank % 2], *middle, columns[rank // 2])
        else:
            box = ((), *middle, ())
        boxes.append(box)
    return BoxLayout(tuple(shape), tuple(boxes))


def _pieces(cut, shape, world, whole):
    """Each rank's piece of ``whole`` (contiguous, as it holds it) and its slabs."""
    if cut is _boxes:
        layout = _boxes(shape, world)
        layout.check_tiles()
        pieces = [whole[layout._indices[r]].contiguous() for r in range(world)]
    else:
        ranges = cut(shape, world)
        numel = math.prod(shape)
        layout = ShardLayout(tuple(shape), (numel,), 0, tuple(ranges), (0,) * world)
        pieces = [whole.reshape(-1)[start:stop] for start, stop in ranges]
    assert sum(p.numel() for p in pieces) == whole.numel()
    return pieces, [slabs_of(layout, r) for r in range(world)]


@pytest.mark.parametrize("cut", [_row_ranges, _flat_ranges, _boxes], ids=["dim0", "flat", "box"])
@pytest.mark.parametrize(
    "shape, block_size, world",
    [((37, 20), 8, 3), ((16, 16), 8, 2), ((61, 61), 8, 4), ((10, 7, 9), 4, 4), ((45,), 8, 4)],
)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "runs"])
def test_parts_rebuild_rows_and_shards(shape, block_size, world, cut, interleaved):
    spec = _spec(shape, block_size)
    assert blocks_are_boxes(spec)
    whole = torch.randn(shape, dtype=torch.float64)
    rows = spec.to_rows(whole)  # the assembler's row form, padding zero
    shards, slabs = _pieces(cut, shape, world, whole)
    if cut is _row_ranges:  # a range of whole rows is one box
        assert all(len(s) <= 1 for s in slabs)
    if interleaved:  # three owners, rows dealt out in turn
        owners = [tuple(range(o, spec.rows, 3)) for o in range(3)]
    else:  # three owners, runs of rows (blocks side by side: merged parts)
        owners = [tuple(range(*chunk_range(spec.rows, 3, o))) for o in range(3)]
    _check_round_trip(spec, rows, shards, slabs, owners)


def _check_round_trip(spec, rows, shards, slabs, owners) -> None:
    """Each owner's piece from every shard's parts is its rows; every shard from the owners'."""
    rebuilt_shards = [torch.zeros_like(s) for s in shards]
    for held in owners:
        piece = torch.zeros(len(held), *spec.block_shape, dtype=rows.dtype)
        for shard, shard_slabs, rebuilt in zip(shards, slabs, rebuilt_shards, strict=True):
            parts = box_parts(spec, held, shard_slabs)
            scatter_block_parts(piece, gather_parts(shard, shard_slabs, parts), parts)
            # and back: the owner's parts of this shard, from its piece
            scatter_parts(rebuilt, shard_slabs, gather_block_parts(piece, parts), parts)
        # exact: copies only
        assert torch.equal(piece, rows[list(held)]), held
    for shard, rebuilt in zip(shards, rebuilt_shards, strict=True):
        assert torch.equal(rebuilt, shard)


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 1, 3, 2), (11,)])
def test_flat_slabs_tile_any_range_with_boxes(shape):
    """Every range of the flattened parameter, as boxes whose runs follow each other."""
    numel = math.prod(shape)
    index = torch.arange(numel).reshape(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            slabs = flat_slabs(shape, start, stop)
            assert len(slabs) <= 2 * len(shape) - 1
            piece = torch.arange(start, stop)  # the range, as a rank holds it
            covered = []
            for slab in slabs:
                box = tuple(slice(o, o + n) for o, n in zip(slab.origin, slab.shape, strict=True))
                assert torch.equal(slab.view(piece), index[box])
                covered += index[box].reshape(-1).tolist()
            assert covered == list(range(start, stop)), (start, stop)


def test_blocks_side_by_side_are_one_part():
    """A run of whole blocks along the last dim inside one slab is one part (one copy)."""
    spec = _spec((20, 32), 8)  # grid (3, 4) of (7, 8) blocks; the last block row padded
    whole = torch.randn(20, 32, dtype=torch.float64)
    slabs = flat_slabs((20, 32), 0, 20 * 32)
    parts = box_parts(spec, tuple(range(12)), slabs)
    assert [(p.position, p.count) for p in parts] == [(0, 4), (4, 4), (8, 4)]
    piece = torch.zeros(12, *spec.block_shape, dtype=whole.dtype)
    scatter_block_parts(piece, gather_parts(whole, slabs, parts), parts)
    assert torch.equal(piece, spec.to_rows(whole))
    # a shard that cuts the columns (a box of columns 4..27) leaves the edge blocks partial
    box = box_slabs((tuple(range(20)), tuple(range(4, 28))))
    counts = [p.count for p in box_parts(spec, (0, 1, 2, 3), box)]
    assert counts == [1, 2, 1]


def test_box_slabs_are_the_runs_of_a_box():
    """A box's slabs hold exactly its elements, each where the local tensor has it."""
    whole = torch.arange(12 * 10).reshape(12, 10)
    box = ((2, 3, 6, 7, 10, 11), (4, 5, 6, 7, 8))  # strided rows, one column range
    local = whole[torch.tensor(box[0])[:, None], torch.tensor(box[1])]
    slabs = box_slabs(box)
    assert len(slabs) == 3  # three runs of rows, one of columns
    seen = []
    for slab in slabs:
        where = tuple(slice(o, o + n) for o, n in zip(slab.origin, slab.shape, strict=True))
        assert torch.equal(slab.view(local), whole[where])
        seen += slab.view(local).reshape(-1).tolist()
    assert sorted(seen) == sorted(local.reshape(-1).tolist())
    assert box_slabs(((), (1, 2))) == []  # an empty piece


def test_where_the_direct_exchange_applies():
    spec = _spec((37, 20), 8)
    layout = ShardLayout((37, 20), (37, 20), 0, ((0, 19), (19, 37)), (0, 0))
    assert direct_exchange_applies(spec, layout)
    flat = ShardLayout((37, 20), (740,), 0, ((0, 371), (371, 740)), (0, 0))  # FSDP1, DeepSpeed
    assert direct_exchange_applies(spec, flat)
    dim_1 = ShardLayout((37, 20), (37, 20), 1, ((0, 10), (10, 20)), (0, 0))
    assert not direct_exchange_applies(spec, dim_1)  # columns: not one flat range each
    assert direct_exchange_applies(spec, _boxes((37, 20), 4))  # FSDP2 over tensor parallel
    merged = _spec((8, 6, 3, 3), 5, merge_dims=True, max_precond_dim=16)  # (8, 6, 9)
    assert not blocks_are_boxes(merged)
    assert not blocks_are_boxes(_spec((37, 20), None))  # no blocks


def _random_case(seed: int):
    """A parameter, a block size, a sharding and owners drawn at random (reproducibly).

    Shardings: flat ranges cut anywhere (some empty), or a DTensor-like product of per-dim
    partitions into arbitrary index subsets (not runs), as nested strided shards make them.
    Owners: every block row given to one of up to four owners, in any pattern.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    shape = (draw(2, 13), *(draw(1, 13) for _ in range(draw(0, 2))))
    spec = _spec(shape, draw(1, max(shape) - 1))  # below the largest dim: blocks
    world = draw(1, 5)
    if seed % 2:  # flat ranges: sorted cut points, repeats give empty ranges
        numel = math.prod(shape)
        cuts = sorted(draw(0, numel) for _ in range(world - 1))
        cuts = [0, *cuts, numel]
        layout = ShardLayout(
            shape, (numel,), 0, tuple(zip(cuts[:-1], cuts[1:], strict=True)), (0,) * world
        )
        pieces = [torch.arange(numel)[a:b] for a, b in layout.ranges]
    else:  # boxes: each dim's indices dealt at random to up to two groups
        groups = []
        for size in shape:
            count = draw(1, min(2, size))
            label = torch.randint(0, count, (size,), generator=gen)
            label[:count] = torch.arange(count)  # no empty group
            groups.append(
                [tuple(torch.nonzero(label == g).flatten().tolist()) for g in range(count)]
            )
        boxes = tuple(itertools.product(*groups))
        layout = BoxLayout(shape, boxes)
        layout.check_tiles()
        index = torch.arange(math.prod(shape)).reshape(shape)
        pieces = [index[layout._indices[r]].contiguous() for r in range(len(boxes))]
        world = len(boxes)
    label = torch.randint(0, draw(1, 4), (spec.rows,), generator=gen)
    owners = [tuple(torch.nonzero(label == o).flatten().tolist()) for o in label.unique()]
    return spec, shape, layout, pieces, world, owners


@pytest.mark.parametrize("seed", range(60))
def test_random_layouts_and_owners_round_trip(seed):
    """Any sharding the direct exchange accepts, any owners: copies rebuild rows and shards."""
    spec, shape, layout, index_pieces, world, owners = _random_case(seed)
    assert direct_exchange_applies(spec, layout)
    whole = torch.randn(shape, dtype=torch.float64)
    flat = whole.reshape(-1)
    shards = [flat[p.reshape(-1)].reshape(p.shape) for p in index_pieces]
    slabs = [slabs_of(layout, r) for r in range(world)]
    _check_round_trip(spec, spec.to_rows(whole), shards, slabs, owners)
