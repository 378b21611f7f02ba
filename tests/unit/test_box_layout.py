"""BoxLayout: where each rank's piece of a DTensor lives, for layouts beyond one sharded dim.

Expected boxes are written from what the parallelisms do (tensor parallel cuts first, FSDP
then cuts each TP piece), not from the code under test.
"""

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from distsoap.box_layout import BoxLayout, held_box

MESH = (2, 2)  # (dp, tp), row-major: rank = 2 * dp + tp
COORDS = [[dp, tp] for dp in range(2) for tp in range(2)]


def test_fsdp_over_colwise_tp_holds_strided_rows():
    # colwise TP: tp rank t holds rows 3t..3t+2 of 6; FSDP then splits those 3 rows 2 / 1
    placements = (_StridedShard(0, split_factor=2), Shard(0))
    boxes = [held_box((6, 4), MESH, c, placements) for c in COORDS]
    cols = (0, 1, 2, 3)
    assert boxes == [((0, 1), cols), ((3, 4), cols), ((2,), cols), ((5,), cols)]


def test_fsdp_over_rowwise_tp_holds_a_block_of_rows_and_columns():
    placements = (Shard(0), Shard(1))  # FSDP on rows over dp, TP on columns over tp
    boxes = [held_box((3, 6), MESH, c, placements) for c in COORDS]
    assert boxes == [
        ((0, 1), (0, 1, 2)),
        ((0, 1), (3, 4, 5)),
        ((2,), (0, 1, 2)),
        ((2,), (3, 4, 5)),
    ]


@pytest.mark.parametrize(
    "placements",
    [
        (_StridedShard(0, split_factor=2), Shard(0)),
        (Shard(0), Shard(1)),
        (Shard(1), Replicate()),
        (Shard(0), Shard(0)),
    ],
)
def test_boxes_agree_with_dtensors_local_shape_and_offset(placements):
    shape = (7, 6)
    for c in COORDS:
        box = held_box(shape, MESH, c, placements)
        local_shape, offset = _compute_local_shape_and_global_offset(shape, MESH, c, placements)
        assert tuple(len(ix) for ix in box) == local_shape
        assert tuple(ix[0] if ix else None for ix in box) == tuple(
            o if n else None for o, n in zip(offset, local_shape)
        )


def test_pieces_assemble_into_the_whole_and_replicas_share_the_sending():
    placements = (Shard(1), Replicate())  # every piece held twice (tp replicas)
    layout = BoxLayout((4, 6), tuple(held_box((4, 6), MESH, c, placements) for c in COORDS))
    layout.check_tiles()
    whole = torch.arange(24.0).reshape(4, 6)
    for owner in range(4):
        sources = layout.sources(owner)
        assert len(sources) == 2  # one copy of each distinct piece
        pieces = [layout.extract(whole, r) for r in sources]
        assert torch.equal(layout.assemble(pieces, owner), whole)
    assert {layout.sources(o) for o in range(4)} == {(0, 2), (1, 3)}  # both copies send
    assert layout.piece_key(0) == layout.piece_key(1) != layout.piece_key(2)


def test_overlapping_or_missing_pieces_are_refused():
    rows = (0, 1, 2)
    overlapping = BoxLayout((3, 2), (((0, 1), (0, 1)), ((1, 2), (0, 1))))
    with pytest.raises(ValueError, match="exactly once"):
        overlapping.check_tiles()
    missing = BoxLayout((3, 2), ((rows, (0,)),))
    with pytest.raises(ValueError, match="exactly once"):
        missing.check_tiles()
