"""The direct exchange's parts against the assembler's definition (``BlockSpec.to_rows``).

What an owner puts together from every shard holder's parts must be its rows of the whole
parameter in row form (padding zero), and what every rank puts together from every owner's
update parts must be its shard of the whole update. Shards are dim-0 ranges (FSDP2's
``Shard(0)``) and flat ranges that cut rows anywhere (FSDP1, DeepSpeed).
"""

from __future__ import annotations

import math

import pytest
import torch

from distsoap.engine.blocks import make_block_spec
from distsoap.sharding import ShardLayout, chunk_range
from distsoap.strategies.direct_rows import (
    blocks_are_boxes,
    box_parts,
    direct_exchange_applies,
    flat_slabs,
    gather_block_parts,
    gather_parts,
    scatter_block_parts,
    scatter_parts,
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


@pytest.mark.parametrize("cut", [_row_ranges, _flat_ranges], ids=["dim0", "flat"])
@pytest.mark.parametrize(
    "shape, block_size, world",
    [((37, 20), 8, 3), ((16, 16), 8, 2), ((61, 61), 8, 4), ((10, 7, 9), 4, 4), ((45,), 8, 4)],
)
def test_parts_rebuild_rows_and_shards(shape, block_size, world, cut):
    spec = _spec(shape, block_size)
    assert blocks_are_boxes(spec)
    whole = torch.randn(shape, dtype=torch.float64)
    rows = spec.to_rows(whole)  # the assembler's row form, padding zero
    ranges = cut(shape, world)
    assert sum(stop - start for start, stop in ranges) == whole.numel()
    shards = [whole.reshape(-1)[start:stop] for start, stop in ranges]
    slabs = [flat_slabs(shape, start, stop) for start, stop in ranges]
    if cut is _row_ranges:  # a range of whole rows is one box
        assert all(len(s) <= 1 for s in slabs)
    owners = [tuple(range(o, spec.rows, 3)) for o in range(3)]  # three owners, rows interleaved
    rebuilt_shards = [torch.zeros_like(s) for s in shards]
    for held in owners:
        piece = torch.zeros(len(held), *spec.block_shape, dtype=whole.dtype)
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
            covered = []
            for slab in slabs:
                assert slab.offset == len(covered)
                box = tuple(slice(o, o + n) for o, n in zip(slab.origin, slab.shape, strict=True))
                covered += index[box].reshape(-1).tolist()
            assert covered == list(range(start, stop)), (start, stop)


def test_where_the_direct_exchange_applies():
    spec = _spec((37, 20), 8)
    layout = ShardLayout((37, 20), (37, 20), 0, ((0, 19), (19, 37)), (0, 0))
    assert direct_exchange_applies(spec, layout)
    flat = ShardLayout((37, 20), (740,), 0, ((0, 371), (371, 740)), (0, 0))  # FSDP1, DeepSpeed
    assert direct_exchange_applies(spec, flat)
    dim_1 = ShardLayout((37, 20), (37, 20), 1, ((0, 10), (10, 20)), (0, 0))
    assert not direct_exchange_applies(spec, dim_1)  # columns: not one flat range each
    merged = _spec((8, 6, 3, 3), 5, merge_dims=True, max_precond_dim=16)  # (8, 6, 9)
    assert not blocks_are_boxes(merged)
    assert not blocks_are_boxes(_spec((37, 20), None))  # no blocks
