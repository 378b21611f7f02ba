"""ShardLayout: pieces, sources and flat ranges against the reshape-narrow definition."""

import pytest
import torch

from distsoap.sharding import ShardLayout, chunk_range


def _layouts() -> dict[str, ShardLayout]:
    def even(size: int, parts: int) -> tuple[tuple[int, int], ...]:
        return tuple(chunk_range(size, parts, r) for r in range(parts))

    return {
        # FSDP2 Shard(0) of a (10, 3) weight over 4 ranks: 3, 3, 3, 1 rows
        "shard0": ShardLayout((10, 3), (10, 3), 0, even(10, 4), (0, 0, 0, 0)),
        # 3 rows over 4 ranks: the last rank holds nothing
        "shard0_empty": ShardLayout((3, 5), (3, 5), 0, even(3, 4), (0, 0, 0, 0)),
        # Shard(1): pieces are column ranges, not ranges of the flattened weight
        "shard1": ShardLayout((4, 10), (4, 10), 1, even(10, 3), (0, 0, 0)),
        # FSDP1 / DeepSpeed: element ranges of the flattened (5, 6) weight, uneven
        "flat": ShardLayout((5, 6), (1, 30), 1, ((0, 7), (7, 21), (21, 30)), (0, 0, 0)),
        # HSDP: 2 replica groups of 2 shards, ranks 0-1 and 2-3
        "hsdp": ShardLayout((6, 4), (6, 4), 0, even(6, 2) * 2, (0, 0, 1, 1)),
        # 3-D weight split on its first dim
        "shard0_3d": ShardLayout((5, 2, 3), (5, 2, 3), 0, even(5, 2), (0, 0)),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_pieces_extract_assemble_and_flat_ranges_agree(name):
    layout = _layouts()[name]
    whole = torch.arange(float(torch.Size(layout.full_shape).numel())).reshape(layout.full_shape)
    world = len(layout.ranges)
    pieces = [layout.extract(whole, r) for r in range(world)]
    assert [p.numel() for p in pieces] == [layout.numel(r) for r in range(world)]
    for owner in range(world):
        sources = layout.sources(owner)
        assert owner in sources
        assert all(layout.replica[s] == layout.replica[owner] for s in sources)
        assert torch.equal(layout.assemble([pieces[s] for s in sources]), whole)
    if layout.pieces_concatenate:
        flat = whole.reshape(-1)
        for r, (start, stop) in enumerate(layout.flat_ranges):
            assert torch.equal(flat[start:stop], pieces[r])


def test_which_layouts_concatenate():
    concatenate = {name: layout.pieces_concatenate for name, layout in _layouts().items()}
    assert concatenate == {
        "shard0": True,
        "shard0_empty": True,
        "shard1": False,
        "flat": True,
        "hsdp": True,
        "shard0_3d": True,
    }


def test_sources_are_ordered_by_range_within_the_replica_group():
    layout = ShardLayout((6,), (6,), 0, ((3, 6), (0, 3), (0, 3), (3, 6)), (0, 0, 1, 1))
    assert layout.sources(0) == layout.sources(1) == (1, 0)
    assert layout.sources(2) == layout.sources(3) == (2, 3)
