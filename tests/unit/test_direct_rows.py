"""The direct exchange's parts against the assembler's definition (``BlockSpec.to_rows``).

What an owner puts together from every shard holder's parts must be its rows of the whole
parameter in row form (padding zero), and what every rank puts together from every owner's
update parts must be its shard of the whole update.
"""

from __future__ import annotations

import pytest
import torch

from distsoap.engine.blocks import make_block_spec
from distsoap.sharding import ShardLayout, chunk_range
from distsoap.strategies.direct_rows import (
    blocks_are_boxes,
    box_parts,
    direct_exchange_applies,
    gather_block_parts,
    gather_parts,
    scatter_parts,
)


def _spec(shape, block_size, **options):
    kwargs = dict(
        max_precond_dim=64, merge_dims=False, precondition_1d=True, data_format="channels_first"
    )
    kwargs.update(options)
    return make_block_spec(shape, block_size=block_size, **kwargs)


@pytest.mark.parametrize(
    "shape, block_size, world",
    [((37, 20), 8, 3), ((16, 16), 8, 2), ((61, 61), 8, 4), ((10, 7, 9), 4, 3), ((45,), 8, 4)],
)
def test_parts_rebuild_rows_and_shards(shape, block_size, world):
    spec = _spec(shape, block_size)
    assert blocks_are_boxes(spec)
    whole = torch.randn(shape, dtype=torch.float64)
    rows = spec.to_rows(whole)  # the assembler's row form, padding zero
    ranges = [chunk_range(shape[0], world, r) for r in range(world)]
    shards = [whole[start:stop] for start, stop in ranges]
    owners = [tuple(range(o, spec.rows, 3)) for o in range(3)]  # three owners, rows interleaved
    rebuilt_shards = [torch.zeros_like(s) for s in shards]
    for held in owners:
        piece = torch.zeros(len(held), *spec.block_shape, dtype=whole.dtype)
        for (start, stop), shard, rebuilt in zip(ranges, shards, rebuilt_shards, strict=True):
            parts = box_parts(spec, held, start, stop)
            scatter_parts(piece, gather_parts(shard, parts), parts, blocks=True)
            # and back: the owner's parts of this shard, from its piece
            scatter_parts(rebuilt, gather_block_parts(piece, parts), parts, blocks=False)
        # exact: copies only
        assert torch.equal(piece, rows[list(held)]), held
    for shard, rebuilt in zip(shards, rebuilt_shards, strict=True):
        assert torch.equal(rebuilt, shard)


def test_where_the_direct_exchange_applies():
    layout = ShardLayout((37, 20), (37, 20), 0, ((0, 19), (19, 37)), (0, 0))
    assert direct_exchange_applies(_spec((37, 20), 8), layout)
    flat = ShardLayout((37, 20), (740,), 0, ((0, 370), (370, 740)), (0, 0))  # FSDP1, DeepSpeed
    assert not direct_exchange_applies(_spec((37, 20), 8), flat)
    dim_1 = ShardLayout((37, 20), (37, 20), 1, ((0, 10), (10, 20)), (0, 0))
    assert not direct_exchange_applies(_spec((37, 20), 8), dim_1)
    merged = _spec((8, 6, 3, 3), 5, merge_dims=True, max_precond_dim=16)  # (8, 6, 9)
    assert not blocks_are_boxes(merged)
    assert not blocks_are_boxes(_spec((37, 20), None))  # no blocks
